"""``tailorlm perf engine``: the engine side by side with the bare base model and with stock PEFT, in one
process on this machine. One small file per question beside a short shared harness (Punica's layout):

- ``harness``: ``PerfConfig``, ``Timing``, ``Check``, ``Section``, the interleaved timing loop, peak RSS
  and machine load per section;
- ``workloads``: synthetic chat prompts and training users, real task rows, random resident users;
- ``contenders``: the bare base model, stock PEFT (``adapter_names``; training one user at a time), the
  engine with and without prefix sharing;
- the questions: ``mixed`` (a mixed batch per registered kind), ``decode``, ``gemm`` (matmul peak at the
  model's shapes), ``train`` (synthetic and task rows, useful FLOP/s), ``memory`` (where training memory
  goes), ``load`` (cold load into a slot), ``size`` (bytes at rest);
- ``runner``: the sections in order and the run; ``report``: the printed tables.

A new question is one file with a ``bench_<name>(bench) -> Section`` and one line in ``runner.RUNNERS``.
"""
