"""Files on disk: this library's adapter folders (``native``), PEFT LoRA folders (``peft_lora``,
``peft_lora_experts``) and inference engines' formats (``engines``). The top wing: it imports the others."""
