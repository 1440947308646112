"""Speech-to-text, LLM and text-to-speech engines behind small protocols,
chosen by a string kind. Adding an engine is one module and one line in
`registry.py`; a setting or a persona switches engines without a rebuild."""
