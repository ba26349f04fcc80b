"""Plugins that give training frameworks DTDR checkpoints through the doors
they already have. Each submodule imports its framework, which is an optional
extra; nothing in the core imports them.

* :mod:`torch_dtdr.integrations.lightning`: ``DTDRCheckpointIO`` (extra ``lightning``)
* :mod:`torch_dtdr.integrations.transformers`: ``save_pretrained`` / ``from_pretrained`` (extra ``hf``)
* :mod:`torch_dtdr.integrations.accelerate`: ``save_state`` / ``load_state`` hooks (extra ``accelerate``)
"""
