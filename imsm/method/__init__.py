"""The methods: the IMSM gate and siamese model, the PEFT adapters by name, and the baselines (LoRAMoE, PiSSA/CorDA
inits, adapter scaling)."""
