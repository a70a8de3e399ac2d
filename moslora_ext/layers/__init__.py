"""The adapter layers: one file per kind of base module (``linear``, ``quantized``, ``conv``, ``embedding``,
``experts``, ``routers``) on the shared ``AdapterLayer`` (``base``), and ``dispatch``, the registry of base module
kinds: the one place that says which kind takes which module. Imports only ``moslora_ext.ops``."""
