"""MoSLoRA as a PEFT tuner (``MoSLoRAConfig``, peft_type "MOSLORA"): which peft it works with and its
registration (``compat``, imported by ``import moslora_ext``: it imports no peft), the tuner (``tuner``,
imported once peft is), its layers and guards, and diffusers' loaders (``diffusers``). Imports ``ops``,
``layers`` and ``model``; nothing here imports the peft library until the route is used."""
