"""Benchmarks that measure tailorlm on the machine it runs on, side by side with the alternatives."""
