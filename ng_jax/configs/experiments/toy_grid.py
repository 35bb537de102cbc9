"""The confirmatory grid on the toy world: {NFT, AWM, DPO} x {base, +NormGuard} x {preference reward,
verifier} x seeds, plus the KL control (AWM and NFT with a stronger KL term to the reference, preference
reward), then the analyses of the most inflating seed, then docs/RESULTS.md with paired statistics and a
verdict per claim (ng_jax/eval/grid.py, ng_jax/eval/report.py).

    python -m ng_jax.main --config=ng_jax/configs/experiments/toy_grid.py

Runs whose `summary.json` exists are reused and an interrupted run resumes from its checkpoint, so the
command can be stopped and repeated (e.g. in the background: `nohup ... &`); runs trained by other
code than the checkout are refused. Two workers share the runs and finish sooner, on 2 cores too
(`--config.grid.worker=0/2` and `=1/2` at once, then the command without it for the report).
Base and NormGuard runs of a seed share initialisation, prompts,
rollout noise and evaluation noise. The seeds (100-104) are not those of the pilot (0) or of the
calibration sweep (0, 1; ng_jax/configs/experiments/calibration.py), which chose the settings confirmed here.
Tiny smoke version (minutes): tests/e2e/test_grid.py.
"""

import ml_collections as mlc

# The KL control's weight per method: the KL-to-reference weight whose final reward gain matched NormGuard's
# (its calibrated lambda) in the frontier's seed 0, interpolated linearly in weight between the base arm and
# the weakest KL arm (docs/results/frontier/RESULTS.md, "Weight matching NormGuard's reward"). The defaults are 1e-4.
# (Interpolated in log weight, the same runs named AWM 0.0091 and NFT 0.0081; NFT's KL run at 0.0081 gained
# 1.561 where its base gained 1.542 and NormGuard 1.335 (seed 100): no control at all.)
KL_CONTROL = {"awm": ("loss.beta", 0.065), "nft": ("loss.kl_beta", 0.34)}


def get_config(arg=None):
    c = mlc.ConfigDict()
    c.job = "grid"
    c.name = "toy_grid"
    c.seed = 0
    c.workdir = "workdirs/toy_grid"   # one sub-directory per run, plus initial_evals/, floors.json, analysis/
    c.reference = ""                  # the shipped reference (ng_jax/assets/reference)
    # The world of the pilot (docs/PILOT.md): samples centred on the data mean as SD3 / FLUX centre their
    # latents, rendered with the display headroom of a VAE decoder (ng_jax/data/render.py).
    c.space = "centred"
    c.render = "headroom"

    c.grid = mlc.ConfigDict()
    c.grid.methods = ("nft", "awm", "dpo")
    # arm -> the method's config file without / with `_normguard` (its calibrated lambda and margin), plus
    # optional settings ("normguard.lam=0.3,normguard.margin=0.02"), optionally limited to some methods / rewards.
    # `kl`: the control a reviewer asks for first, the base method held closer to the reference by a stronger
    # KL term, at the weight whose reward matched NormGuard's in the frontier (KL_CONTROL).
    c.grid.arms = mlc.ConfigDict({"base": {"normguard": False, "set": ""},
                                  "normguard": {"normguard": True, "set": ""},
                                  "kl": {"normguard": False, "set": "", "methods": tuple(KL_CONTROL),
                                         "rewards": ("preference",),
                                         "set_by_method": {m: f"{k}={w}" for m, (k, w) in KL_CONTROL.items()}}})
    c.grid.base_arm = "base"
    c.grid.normguard_arm = "normguard"
    c.grid.controls = ("kl",)         # arms NormGuard is also compared with, paired by seed
    c.grid.choose_max_gain_loss = 0.0  # > 0: the report names the arm with the largest KID reduction among those
                                       # losing at most this fraction of the base gain (calibration; 0 = off)
    c.grid.match_weights = mlc.ConfigDict()  # method -> a dotted key its non-NormGuard arms set (e.g. "loss.beta"):
                                             # the report interpolates the value matching NormGuard's reward gain
    # one reward per run: a registered name (weight 1) or a name in grid.composites
    c.grid.rewards = ("preference", "verifier")
    c.grid.composites = mlc.ConfigDict({"verifier_colour": {"verifier": 1.0, "colourfulness": 0.01}})
    c.grid.seeds = (100, 101, 102, 103, 104)
    # the preference reward carries the claims; the verifier cells drop to 3 seeds to fit ~6 h on 2 cores
    c.grid.seeds_by_reward = mlc.ConfigDict({"verifier": (100, 101, 102)})
    c.grid.allow_mixed_code = False   # True: report runs trained by different commits (the report says so)
    c.grid.report_only = False        # True: no training, the report of the runs finished so far (the floors,
                                      # analyses and rescaling still sample what is missing; analysis_reward=""
                                      # skips the last two for a quick snapshot)
    c.grid.worker = ""                # "I/N": train only every N-th run from the I-th, then stop (N commands at
                                      # once share the runs); the command without it then reports
    c.grid.export = ""                # a directory (or gs://...): after the report, a copy of the workdir without
                                      # checkpoints (finished runs' records, the shown samples, analyses), which
                                      # the same command at the same commit reuses elsewhere and reports the same
    c.grid.floor_draws = 20           # real-vs-real draws of the KID / FD noise floors (0: not measured)
    c.grid.margins = mlc.ConfigDict({"inflation": 0.03,     # base ratio above 1.03 counts as inflation
                                     "reward_kept": 0.2})   # non-inferiority: lose < 20% of the base gain
    c.grid.analysis_reward = "preference"   # analyses on this reward's most inflating seed, scored with this
                                            # reward ("" = no analyses and no rescaling)
    # every seed's base run of these methods (analysis reward) sampled again with inference-time renormalisation
    # and CFG-rescale, paired with its NormGuard run; also under grid.report_only (it trains nothing). DPO is left
    # out: its base runs did not inflate the norm in the frontier (docs/DEFAULTS.md). () = off
    c.grid.rescaling_methods = ("awm", "nft")

    # Applied to every run's config (dotted keys as on the command line).
    c.overrides = mlc.ConfigDict()
    c.overrides.rl = mlc.ConfigDict({"epochs": 20})
    c.overrides.eval = mlc.ConfigDict({
        "every": 5, "num_prompts": 0, "samples_per_prompt": 12,   # 17 evaluation prompts x 12 = 204 images
        "final_samples_per_prompt": 24, "batch_size": 102,        # before and after training: 408 images
        # the report reads norm ratios from the final 20-step evaluations only: the others skip the reference pass
        "norms": "final",
        "variants": {"guided": {"cfg_scale": 4.5, "final_only": True},
                     "steps4": {"num_steps": 4, "final_only": True, "norms": "never"},
                     "steps6": {"num_steps": 6, "final_only": True, "norms": "never"}},
    })

    c.analysis = mlc.ConfigDict()     # settings of the analyses (see ng_jax/configs/analyze.py)
    c.analysis.samples_per_prompt = 8
    c.analysis.few_steps = (4, 6, 10, 20, 40)
    c.analysis.cfg_rescale_phi = 0.7
    c.analysis.guided_cfg_scale = 4.5
    c.analysis.adjoint_prompts = 16
    c.analysis.adjoint_samples = 4    # 64 samples

    c.results = "docs/RESULTS.md"     # the report; its JSON and figures go to docs/results/
    return c
