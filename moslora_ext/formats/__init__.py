"""Files on disk: atomic folder writes and checked reading (``files``), the all-or-nothing load every reader
ends in (``loading``), this library's adapter folders (``native``), adapters inside transformers checkpoints
(``transformers``), PEFT LoRA folders (``peft_lora``, ``peft_lora_experts``) and inference engines' formats
(``engines``). The top wing: it imports the others."""
