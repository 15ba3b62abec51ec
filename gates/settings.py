"""Typed settings of the gates and the rollout plan (pydantic models, validation only).

The defaults are the documented default gate set (docs/gates.md): what ``mirrorgate
replay`` uses without ``--config`` and what the proxy uses when the YAML file has no
``gates:`` / ``rollout:`` sections. Every model forbids unknown keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gates.kinds import check_kind
from gates.presets import DEFAULT_PRESET, Preset, apply_preset

Task = Literal["auto", "classification", "regression", "embedding"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Family(_Strict):
    enabled: bool = True
    blocking: bool = True
    alpha_weight: float = Field(
        1.0, gt=0, description="share of the false-abort budget, relative to other families"
    )


# ---------------------------------------------------------------------------- tolerance


class RateLimit(_Strict):
    """A bound on the rate of out-of-tolerance pairs ("at most max_rate of pairs ...")."""

    enabled: bool = True
    max_rate: float = Field(..., gt=0, lt=1)


class ShiftLimit(RateLimit):
    tol: float = Field(0.2, gt=0, le=1, description="largest |change| of any class probability")
    max_rate: float = Field(0.10, gt=0, lt=1)


class FlipLimit(RateLimit):
    max_rate: float = Field(0.10, gt=0, lt=1)


class CollapseLimit(RateLimit):
    high: float = Field(0.9, gt=0, le=1, description="champion top probability >= high ...")
    low: float = Field(0.5, gt=0, le=1, description="... while the candidate's is < low")
    max_rate: float = Field(0.02, gt=0, lt=1)


class RegressionTolerance(RateLimit):
    atol: float = Field(0.01, ge=0, description="out if |cand - champ| > atol + rtol*|champ|")
    rtol: float = Field(0.10, ge=0, description="relative part of the per-element tolerance")
    max_rate: float = Field(
        0.10, gt=0, lt=1, description="share of pairs allowed out of the tolerance"
    )


class CosineLimit(RateLimit):
    tol: float = Field(0.05, gt=0, le=2, description="cosine distance above which a pair is out")
    max_rate: float = Field(0.05, gt=0, lt=1)


class NormTolerance(RateLimit):
    """vector_regression: the whole row at once (the per-element check is ``regression``)."""

    atol: float = Field(0.01, ge=0, description="out if ||cand - champ|| > atol + rtol*||champ||")
    rtol: float = Field(0.10, ge=0, description="relative part of the row-norm tolerance")
    max_rate: float = Field(
        0.10, gt=0, lt=1, description="share of pairs allowed out of the norm tolerance"
    )


class MismatchLimit(RateLimit):
    """string outputs: pairs whose strings differ at all."""

    max_rate: float = Field(
        0.05, gt=0, lt=1, description="share of pairs allowed to answer a different string"
    )


class ToleranceSettings(_Family):
    """Label-free, per pair: anytime-valid bounds on out-of-tolerance rates."""

    min_samples: int = Field(200, ge=1)
    shift: ShiftLimit = ShiftLimit()
    flip: FlipLimit = FlipLimit()
    collapse: CollapseLimit = CollapseLimit()
    regression: RegressionTolerance = RegressionTolerance()
    norm: NormTolerance = NormTolerance()
    cosine: CosineLimit = CosineLimit()
    mismatch: MismatchLimit = MismatchLimit()


class ContractSettings(_Family):
    """The candidate's gated output must match the champion's name, datatype family and
    per-row shape (gates/contract.py). Blocking, and it decides before any other gate."""

    max_rate: float = Field(
        0.01, gt=0, lt=1, description="rate of contract-breaking pairs tolerated"
    )
    min_samples: int = Field(
        1, ge=1, description="pairs before the contract may PASS (a FAIL needs none)"
    )
    alpha_weight: float = Field(
        0.1,
        gt=0,
        description="small share: a broken contract shows on (nearly) every pair, so a "
        "tenth of a family's budget still fails within a few pairs",
    )


# ------------------------------------------------------------------------------- metric


class PairedMetric(_Strict):
    enabled: bool = True
    blocking: bool = True
    margin: float = Field(..., ge=0, lt=1)
    # Equal by default: the simulations give no detection-based reason to favour one
    # check (docs/gates.md, "Error budget"); a weight moves budget where a user expects
    # the regression (e.g. accuracy 2 : recall 1), fixed before any data.
    alpha_weight: float = Field(
        1.0, gt=0, description="share of the metric family's budget, relative to its other checks"
    )


class AccuracySettings(PairedMetric):
    margin: float = Field(0.01, ge=0, lt=1, description="allowed drop in accuracy (absolute)")


class RecallSettings(PairedMetric):
    margin: float = Field(0.02, ge=0, lt=1, description="allowed drop in each class's recall")
    max_classes: int = Field(64, ge=2, description="classes beyond this share one budget cell")


class HighConfidenceErrorSettings(PairedMetric):
    margin: float = Field(0.01, ge=0, lt=1, description="allowed rise in the hc error rate")
    confidence: float = Field(0.9, gt=0, le=1, description="top probability counted as 'sure'")


class RegressionMetric(PairedMetric):
    margin: float = Field(
        0.05, ge=0, lt=10, description="relative: candidate <= (1 + margin) x champion"
    )


class EvidenceMetric(_Strict):
    """Reported as evidence, never blocking: not a mean of per-request terms."""

    enabled: bool = True
    margin: float = Field(0.02, ge=0, lt=1)


class EceSettings(EvidenceMetric):
    bins: int = Field(15, ge=2, le=100)


class MetricSettings(_Family):
    """Needs labels: paired champion-versus-candidate comparison on the same requests."""

    # Labelled metrics (and their slices) are what detects a worse model; the label-free
    # families catch gross breakage quickly at any budget (docs/gates.md, "Error budget").
    alpha_weight: float = Field(
        3.0, gt=0, description="share of the false-abort budget, relative to other families"
    )
    min_samples: int = Field(200, ge=1, description="labelled pairs before a cell may PASS")
    accuracy: AccuracySettings = AccuracySettings()
    recall: RecallSettings = RecallSettings()
    high_confidence_error: HighConfidenceErrorSettings = HighConfidenceErrorSettings()
    macro_f1: EvidenceMetric = EvidenceMetric()
    precision: EvidenceMetric = EvidenceMetric()
    ece: EceSettings = EceSettings()
    mae: RegressionMetric = RegressionMetric()
    rmse: RegressionMetric = RegressionMetric()
    clip: float | None = Field(
        None,
        gt=0,
        description="regression: |error| clip that bounds the paired statistic; "
        "None = 10x the 99th percentile of the first clip_calibration labelled "
        "champion errors (those pairs are then not tested)",
    )
    clip_calibration: int = Field(200, ge=10)


# ------------------------------------------------------------------------------- slices


class SliceSettings(_Strict):
    """Per-slice copies of the tolerance and metric checks (``key=value`` cells)."""

    enabled: bool = True
    keys: list[str] | None = Field(
        None, description="slice keys to gate; None = every key found, up to max_keys"
    )
    max_keys: int = Field(8, ge=1)
    max_values: int = Field(
        32,
        ge=1,
        description="values per key named at first appearance; later ones share "
        "key=__other__ until admitted by traffic (admit_share)",
    )
    admit_share: float = Field(
        0.02,
        gt=0,
        le=1,
        description="past max_values, a value gets its own cell from the row where its count "
        "reaches this share of its key's counted traffic (and admit_min)",
    )
    admit_min: int = Field(100, ge=1, description="... and at least this many of its rows")
    max_admitted: int = Field(
        32, ge=0, description="cells per key admitted by traffic beyond max_values"
    )
    max_tracked: int = Field(
        1024,
        ge=2,
        description="values per key counted while waiting for a cell; past it the larger "
        "half by count is kept",
    )
    min_samples: int = Field(300, ge=1, description="a slice cell below this may FAIL but not PASS")
    alpha_share: float = Field(
        0.5, gt=0, lt=1, description="share of each check's budget spent on slice cells"
    )
    spread: int = Field(
        4,
        ge=0,
        description="the k-th slice cell to appear gets (spread+1)/((k+spread)(k+spread+1)) "
        "of the slices' budget (sums to 1 however many cells appear)",
    )
    require_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="to advance, only slice cells with at least this share of the check's "
        "traffic must PASS (every cell may FAIL)",
    )
    pass_margin: Literal["sqrt_share", "fixed"] = Field(
        "sqrt_share",
        description="PASS margin of a slice cell: margin / sqrt(share) (an upper confidence "
        "bound of the share) or the check's own margin",
    )
    checks: list[str] = Field(
        default_factory=lambda: [
            "accuracy",
            "high_confidence_error",
            "mae",
            "flip",
            "shift",
            "collapse",
            "regression",
            "cosine",
        ],
        description="checks that get per-slice cells",
    )
    require_pass: bool = Field(
        True, description="to advance, slice cells above require_share must PASS"
    )


# -------------------------------------------------------------------------------- drift


class InputDriftSettings(_Strict):
    """Input features against a reference. A warning on the evidence, never blocking."""

    enabled: bool = True
    features: list[str] | None = Field(None, description="None = every feature found")
    max_features: int = Field(32, ge=1)
    reference: Literal["first_n", "file"] = "first_n"
    reference_path: str | None = Field(None, description="paired-record JSONL when 'file'")
    reference_size: int = Field(1000, ge=50)
    bins: int = Field(10, ge=2, le=100, description="quantile bins of the reference")
    max_categories: int = Field(32, ge=2)
    psi: float | None = Field(0.2, gt=0, description="PSI reference level (evidence only)")
    ks: float | None = Field(
        0.1, gt=0, lt=1, description="limit: largest CDF / category share shift (tested)"
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="own budget: warnings never abort")

    @model_validator(mode="after")
    def _check(self) -> InputDriftSettings:
        if self.reference == "file" and not self.reference_path:
            raise ValueError("reference 'file' needs reference_path")
        if self.psi is None and self.ks is None:
            raise ValueError("set at least one effect size threshold (psi or ks)")
        return self


class OutputDriftSettings(_Family):
    """Candidate's output distribution against the champion's on the same requests."""

    psi: float | None = Field(0.2, gt=0, description="PSI reference level (evidence only)")
    ks: float = Field(
        0.1, gt=0, lt=1, description="limit: largest CDF / class-share difference (tested)"
    )
    bins: int = Field(10, ge=2, le=100)
    edges: list[float] | None = Field(None, description="scalar regression: fixed output bin edges")
    max_elements: int = Field(
        16, ge=1, le=1024, description="vector regression: elements tested one by one"
    )
    max_categories: int = Field(
        32, ge=2, le=1000, description="strings: top champion values tested, the rest __other__"
    )
    reference_size: int = Field(
        1000,
        ge=50,
        description="regression without edges: pairs whose champion outputs "
        "fix the bins (then not tested)",
    )
    min_samples: int = Field(200, ge=1)


class DriftSettings(_Strict):
    input: InputDriftSettings = InputDriftSettings()
    output: OutputDriftSettings = OutputDriftSettings()


# ------------------------------------------------------------------ latency / errors / pinned


class LatencySettings(_Family):
    quantiles: list[float] = Field(default_factory=lambda: [0.95, 0.99])
    max_ratio: float = Field(1.5, gt=0, description="candidate quantile <= ratio x champion's")
    slack_ms: float = Field(5.0, ge=0, description="... + slack (sub-ms noise is not a fail)")
    min_samples: int = Field(
        500, ge=1, description="requests before a latency check may PASS (one per batched request)"
    )
    paired: bool = Field(
        True, description="also test per request: candidate > max_ratio x champion + slack"
    )
    paired_max_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="paired check: at most this share of requests may exceed the limit "
        "(0.5: the median per-request ratio is within max_ratio)",
    )
    timeout_ms: float | None = Field(
        None,
        gt=0,
        description="a failed call counts as this slow (censored, never dropped); None = "
        "its recorded latency, or slower than every bucket when it has none",
    )

    @model_validator(mode="after")
    def _check(self) -> LatencySettings:
        if not self.quantiles or any(not 0 < q < 1 for q in self.quantiles):
            raise ValueError("quantiles must be in (0, 1)")
        return self


class ErrorSettings(_Family):
    max_excess_error_rate: float = Field(
        0.01, ge=0, lt=1, description="candidate error rate - champion's, at most"
    )
    max_excess_timeout_rate: float = Field(0.01, ge=0, lt=1)
    min_samples: int = Field(200, ge=1)


class PinnedSettings(_Strict):
    enabled: bool = True
    blocking: bool = True
    max_failures: int = Field(0, ge=0, description="pinned cases the candidate may get wrong")
    min_cases: int = Field(0, ge=0, description="cases that must be evaluated to PASS")


class HarvestSettings(_Strict):
    """Which pairs become pinned-failure candidates (gates/harvest.py, docs/pinned.md)."""

    enabled: bool = True
    wrong_label: bool = Field(True, description="a labelled pair either model got wrong")
    disagreement: bool = Field(
        True, description="both models confident (>= min_confidence) on different classes"
    )
    min_confidence: float = Field(0.9, gt=0, le=1, description="top-class score for 'confident'")
    candidate_error: bool = Field(
        True, description="the candidate failed (error) on an input the champion served"
    )
    regression_atol: float = Field(
        0.0, ge=0, description="regression: wrong when |output - label| > atol + rtol*|label|"
    )
    regression_rtol: float = Field(0.1, ge=0)
    max_cases_per_rollout: int = Field(
        10_000,
        ge=0,
        description="harvested cases sent to the database per rollout; "
        "past it matches are counted (skipped_rollout_cap), not stored",
    )
    max_cases_per_window: int = Field(
        100,
        ge=0,
        description="per rule and per window_s: a burst (a dead candidate "
        "turning every pair into candidate_error) is counted, not stored",
    )
    window_s: float = Field(60.0, gt=0, description="the window of max_cases_per_window")


# -------------------------------------------------------------------------------- gates


class GatesSettings(_Strict):
    """Which gates run, their limits, and the error budget shared by the blocking ones."""

    preset: Preset = Field(
        DEFAULT_PRESET,
        description="retrained: tolerance and output drift are evidence; equivalence: they "
        "block (gates/presets.py); explicit keys always win",
    )
    task: Task = Field("auto", description="auto: scalar outputs regression, else classes")
    kind: str = Field(
        "auto", description="output kind of the gated output (gates/kinds.py); auto: inferred"
    )
    kinds: dict[str, str] = Field(
        default_factory=dict, description="per output name: its kind (wins over 'kind')"
    )
    alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="false-abort budget for the whole rollout, all blocking gates, "
        "all slices, all looks (Bonferroni over gates, Ville over time)",
    )
    alpha_pass: float = Field(
        0.05, gt=0, lt=0.5, description="per-gate error of a PASS (promotion: all must PASS)"
    )
    contract: ContractSettings = ContractSettings()
    tolerance: ToleranceSettings = ToleranceSettings()
    metric: MetricSettings = MetricSettings()
    slices: SliceSettings = SliceSettings()
    drift: DriftSettings = DriftSettings()
    latency: LatencySettings = LatencySettings()
    errors: ErrorSettings = ErrorSettings()
    pinned: PinnedSettings = PinnedSettings()
    harvest: HarvestSettings = HarvestSettings()

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: object) -> object:
        return apply_preset(data)

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        return value if value == "auto" else check_kind(value, "gates.kind")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: dict[str, str]) -> dict[str, str]:
        return {name: check_kind(k, f"gates.kinds.{name}") for name, k in value.items()}

    def with_slice_keys(self, keys: Iterable[str]) -> GatesSettings:
        """A copy that gates exactly these slice keys, unless keys are configured already.

        Fixing the keys up front (the proxy's configured slice headers / parameters / rules,
        or replay's keys found in the file) splits the error budget over the real number
        of keys instead of ``max_keys``.
        """
        if self.slices.keys is not None:
            return self
        slices = self.slices.model_copy(update={"keys": list(dict.fromkeys(keys))})
        return self.model_copy(update={"slices": slices})


# ------------------------------------------------------------------------------ rollout


class StageSettings(_Strict):
    name: str = Field(..., min_length=1)
    canary_weight: float = Field(0.0, ge=0, le=1, description="share served by the candidate")
    min_pairs: int = Field(1000, ge=0, description="pairs seen in this stage before advancing")
    min_labels: int = Field(200, ge=0, description="labels joined in this stage")
    min_duration_s: float = Field(300.0, ge=0)
    max_duration_s: float | None = Field(86_400.0, gt=0)
    on_max_duration: Literal["hold", "abort"] = "hold"
    require: list[str] | None = Field(
        None,
        description="gate name prefixes that must PASS to leave the stage "
        "(e.g. ['tolerance', 'latency']); None = every blocking gate",
    )

    @model_validator(mode="after")
    def _check(self) -> StageSettings:
        if self.max_duration_s is not None and self.max_duration_s < self.min_duration_s:
            raise ValueError("max_duration_s must be >= min_duration_s")
        return self


def _default_stages() -> list[StageSettings]:
    return [
        StageSettings(name="shadow", canary_weight=0.0),
        StageSettings(name="canary-5", canary_weight=0.05),
        StageSettings(name="canary-25", canary_weight=0.25),
    ]


class RolloutSettings(_Strict):
    """The plan: stages in order; PROMOTE after the last one's conditions are met."""

    stages: list[StageSettings] = Field(default_factory=_default_stages, min_length=1)
    evaluate_every_pairs: int = Field(1000, ge=1, description="evaluate after K new pairs ...")
    evaluate_every_s: float = Field(10.0, gt=0, description="... or T seconds, first wins")

    @model_validator(mode="after")
    def _check(self) -> RolloutSettings:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("stage names must be unique")
        return self
