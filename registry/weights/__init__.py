"""Pure tensor math for the registry: PEFT LoRA I/O, RMM bases, fine-tuning transfer, merges and
update-compatibility metrics. Imports torch and safetensors only (no DB, HTTP or Celery).

Submodules: ``adapters``, ``rmm``, ``transfer``, ``merge``, ``compat``, ``checkpoint``,
``device``, ``errors``. Each function's docstring states the formula it computes.
"""
