"""transformers' and diffusers' own common test suites, vendored (the project runs its tests offline): each file names
its source and what was trimmed at its top. Their license, Apache-2.0 (the same for both projects), is in LICENSE;
`expand.py` is the project's own."""
