"""Privacy core: exact budgets (``accounting``), exact samplers (``samplers``), randomness
sources (``randomness``), the lifetime-budget ledger (``ledger``) and PLD accounting (``pld``).

Submodules are imported explicitly (``from pipeline.privacy.samplers import discrete_gaussian``)
so that importing the package stays cheap.
"""
