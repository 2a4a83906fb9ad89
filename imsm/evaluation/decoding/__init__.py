"""Decoding: batched KV-cache generation, teacher-forced answer likelihood, adapter scaling and the per-model runner
(load, decode, score, write its records; sharded across ranks)."""
