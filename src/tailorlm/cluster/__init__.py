"""Scaling out on Ray (the optional extra ``pip install tailorlm[ray]``): training users' groups on Ray
workers (``training``) and serving from replicas behind Ray Serve (``serving``). Ray is imported only
inside these modules' functions, so the default install never needs it."""
