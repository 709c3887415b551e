"""Workers: a JobSpec turned into a Ray Train run (GreenMIM pretraining or fine-tuning).

Only ``workers.train``, ``workers.run`` and ``workers.checkpointing`` import Ray; ``spec``,
``storage`` and ``artifacts`` are plain Python that the service imports to validate specs and
read a job's checkpoints, metrics and outputs.
"""
