"""MLCConfig: the multilingual-consistency loss's own settings (Bu et al., ICLR 2026)."""

from __future__ import annotations

from dataclasses import dataclass, field

from polyalign.text.languages import normalize_code

# The rejected side of a benign preference pair: the over-refusal MLC training should move away from.
BENIGN_REFUSAL = "I'm sorry, but I can't help with that."


@dataclass
class MLCConfig:
    """Settings of the MLC auxiliary loss and the alignment loss it is added to.

    Alignment:
        paradigm: ``sft`` | ``dpo`` | ``simpo`` | ``orpo``.
        beta: None = the paradigm's published default: DPO 0.1 (sigmoid loss, official MLC),
            SimPO 2.0 (Meng et al.), ORPO 0.1 (the odds-ratio weight lambda of Hong et al.).
        simpo_gamma: SimPO target reward margin (1.0, i.e. gamma / beta = 0.5 as the paper advises).
    MLC (METHODS.md section 1):
        weight: lambda in L = L_align + lambda * L_MLC (official 0.8).
        every: add the MLC term on every ``every``-th optimizer step (official 2).
        tau: temperature of the singular-value cross-entropy (0.2).
        layer: hidden-state index k (None = num_hidden_layers, the final post-norm state).
        projection: ``linear`` (Linear(H, dim), Xavier, zero bias) | ``none``.
        dim: projection size (512).
        languages: prompt languages used for the consistency term (English included).
    Benign prompts (our choice; MLC's PKU data has harmful prompts only, so nothing in it says
    "answer this"; add benign prompts with the recipe's ``data.benign_source``):
        benign_pairs: records of a benign category (``benign``, XSafety's ``commonsense``) become rows
            too: their prompts join the consistency term, and the alignment loss gets chosen = a
            helpful English answer over rejected = ``benign_rejected`` (SFT: the answer as completion).
            Off by default (they used to be skipped). Benign records need every language of
            ``languages`` (builtin:benign has en zh th ar bn sw jv ko vi).
        benign_chosen: ``own`` = the model's own greedy English answer before training (as
            ``polyalign data make-responses``; cached in ``output_dir/benign_answers.jsonl``) |
            ``provided`` = the record's ``meta.output`` or ``meta.chosen``.
        benign_rejected: the refusal string (English).
        benign_max_new_tokens: length of the model's own answers (128).
    Harmful prompts without responses of their own (the built-in benchmark's; issue #25's ``mlc_dpo``):
        harmful_pairs: records labelled harmful (:func:`polyalign.data.records.record_label`) that carry
            no ``meta.chosen``/``rejected`` (``output`` for SFT) become rows: chosen = ``harmful_chosen``
            (a refusal), rejected = the model's own greedy English answer before training (cached with
            the benign ones). Off by default. With ``benign_pairs`` or ``harmful_pairs`` on, every
            record must carry a harmful/benign label (one without is refused, naming file and row).
        harmful_chosen: the refusal string (English) chosen for harmful prompts.
        harmful_skip_refused: a harmful record whose own answer already refuses (the lexicon's
            ``refusal_phrase``) gives no pair (True, since 2026-12-05): chosen and rejected would both
            refuse, and DPO could only learn their wording. (The 0.5B model refuses 15 of the study's
            24 English harmful train prompts with "I'm sorry, but I can't assist with that."; with those
            pairs, against 24 benign pairs that reject a refusal, `mlc_dpo` seed 0 unlearned refusing.)
    """

    paradigm: str = "dpo"
    beta: float | None = None
    simpo_gamma: float = 1.0
    weight: float = 0.8
    every: int = 2
    tau: float = 0.2
    layer: int | None = None
    projection: str = "linear"
    dim: int = 512
    languages: list[str] = field(default_factory=lambda: ["en", "zh", "ar", "ru", "ja", "bn", "sw", "ur", "ps", "ku"])
    max_length: int = 512
    benign_pairs: bool = False
    benign_chosen: str = "own"
    benign_rejected: str = BENIGN_REFUSAL
    benign_max_new_tokens: int = 128
    harmful_pairs: bool = False
    harmful_chosen: str = BENIGN_REFUSAL
    harmful_skip_refused: bool = True

    def __post_init__(self) -> None:
        if self.benign_chosen not in ("own", "provided"):
            raise ValueError(f"benign_chosen must be own or provided, got {self.benign_chosen!r}")
        if self.paradigm not in ("sft", "dpo", "simpo", "orpo"):
            raise ValueError(f"paradigm must be sft, dpo, simpo or orpo, got {self.paradigm!r}")
        if self.every < 1 or self.tau <= 0 or self.weight < 0:
            raise ValueError(f"need every >= 1, tau > 0, weight >= 0 (got {self.every}, {self.tau}, {self.weight})")
        if self.projection not in ("linear", "none"):
            raise ValueError(f"projection must be linear or none, got {self.projection!r}")
        if self.beta is None:
            self.beta = {"simpo": 2.0}.get(self.paradigm, 0.1)
        self.languages = [normalize_code(c) for c in self.languages]
        if len(self.languages) < 2:
            raise ValueError("MLC needs at least two languages")
