"""PAPO inside the engines users already run: verl (``integrations.verl``) and TRL
(``integrations.trl``). Each module imports its engine, an optional extra; nothing else of
papo_fast imports them."""
