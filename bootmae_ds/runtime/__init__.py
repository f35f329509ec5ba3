"""What every trainer shares and nothing method-specific: distributed set-up (``dist``), the
DeepSpeed JSON (``ds_config``), optimizer groups (``optim``), lr/wd schedules (``schedules``),
atomic checkpoints (``checkpoint``), the sharded EMA (``sharded_ema``), metrics (``metrics``) and
the experiment trackers (``trackers``), run state / resume / preemption / stop (``run``) and the
launchers' command line (``launch``)."""
