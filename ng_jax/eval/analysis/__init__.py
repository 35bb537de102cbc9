"""The paper's analyses (ALGORITHMS.md sec 6) as library functions; `ng_jax.eval.analyze` is the job/CLI.

- `checkpoints`: which models an analysis looks at (bundles, RL workdirs' exported policies).
- `adjoint`: dR/d alpha_k through the differentiable sampler and the differentiable verifier.
- `matched`: the matched-reward control from RL run summaries.
- `plots`: the PNG figures.
"""
