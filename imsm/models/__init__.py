"""Backbones that need more than ``AutoModelForCausalLM``: ``chatglm3`` (a ChatGLM3 checkpoint converted once into
transformers' native ``glm`` layout)."""
