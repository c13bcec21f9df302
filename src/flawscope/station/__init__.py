"""The inspection station: every verdict recorded, reviewed by an operator, traceable.

:mod:`.store` (the record database and its image folder), :mod:`.db` (URLs, engines, schema
migrations), :mod:`.recorder` (answers -> records, group commit), :mod:`.confusion` (rates
with intervals), :mod:`.auth` (API keys and roles), :mod:`.metrics` (Prometheus),
:mod:`.logs` (JSON logs), :mod:`.export` (Parquet / CSV).
"""
