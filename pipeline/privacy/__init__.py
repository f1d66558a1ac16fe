"""Privacy core: exact budgets (``accounting``), exact samplers (``samplers``, built on
``inversion`` and ``cks``), randomness sources (``randomness``), the lifetime-budget ledger
(``ledger``) and PLD accounting (``pld``).

Submodules are imported explicitly (``from pipeline.privacy.samplers import discrete_gaussian``)
so that importing the package stays cheap.

Known limitations (keep this list current):

- *Randomness is computational.* The secure and keyed sources are AES-256-CTR keystreams; the
  samplers are exact given uniform bits, so the guarantee holds as far as AES is a PRF (and
  HMAC-SHA256 for keyed sub-keys). Seeded sources are public and must never make a release.
- *No constant-time sampling.* The table sampler's memory access pattern and the rare exact
  resolution path depend on the drawn value; an attacker who can time or observe the cache of
  the measuring process could learn about the noise. Run measurement on a trusted host.
- *Neighbouring relation.* Budgets assume bounded DP (one record changed) and marginal queries
  (each record in exactly one answer per unit). A query that is not a partition of the cells
  would need its own sensitivity.
- *ε figures.* The CKS20 ε is evaluated in interval arithmetic and rounded up to 1e-4. The PLD
  ε rounds every loss up to its grid (pessimistic), but its FFT composition runs in floating
  point (exponentially tilted to keep the decisive tail accurate to ~1e-12 relative); it is
  cross-checked against Google's ``dp_accounting`` in a slow test, never below it.
- *Skipped measurements.* Answers whose parent answer is zero are not drawn (same output
  distribution, see ``pipeline.measure``); a file made that way is not a complete noisy
  measurement file — use ``full`` for that.
- *Ledger.* The SQLite ledger is as trustworthy as the file and the people who can write it; it
  prevents accidental overspend by runs, not a malicious administrator.
"""
