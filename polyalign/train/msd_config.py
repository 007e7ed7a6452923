"""MSDConfig: the method's own settings (TrainingArguments hold the rest)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from polyalign.losses.msd import KINDS
from polyalign.models.sampling import DRAWS
from polyalign.text.languages import normalize_code

# METHODS.md section 2, verbatim.
TEACHER_TEMPLATE = (
    "You are a helpful assistant.\n"
    "User query: {target_query}\n"
    "The query in English is: {english_query}\n"
    "Instructions:\n"
    "1. Analyze the query in English to determine if it violates safety guidelines (e.g., illegal, harmful, dangerous).\n"
    "2. If unsafe, generate a polite refusal. If safe, answer helpfully. Always respond in the same language as the "
    "original query.\n"
    "Please output your final response directly:"
)

# Our choice for small models: the paper's template names safety, and a 0.5B teacher shown it
# refuses benign queries too (in English), so distillation can only teach refusing everything.
# Without the instruction the teacher's own English judgement decides: on the built-in train
# split, Qwen2.5-Coder-0.5B refused 0/8 benign and 5/8 harmful th/zh queries (docs/msd.md).
SELECTIVE_TEMPLATE = "{target_query}\n\n(In English: {english_query})"

# The teacher reads the English query only: its English behaviour, which is what the model is known
# to get right, with no instruction to bias it (for a 0.5B model the selective template's teacher
# refused only 6/12 harmful queries, this one 12/12, and 3/12 benign ones; docs/msd.md).
ENGLISH_ONLY_TEMPLATE = "{english_query}"

# Appended to the teacher's user turn by ``language_hint``. The teacher probe (docs/msd.md) found a
# 0.5B teacher shown the English query answers in English: 0/24 answers in the query's language with
# the paper's template (which asks for it mid-instruction), 1/24 with the selective one, and 24/24
# with the selective one ending in this line. The student copies the teacher's distribution, so a
# teacher answering in the query's language is the simplest language-faithful target; the trainer
# logs ``fidelity/<lang>`` to measure it.
# Templates by name, so a recipe or sweep override can say ``msd.teacher_template=selective``.
TEMPLATES = {"paper": TEACHER_TEMPLATE, "selective": SELECTIVE_TEMPLATE, "english_only": ENGLISH_ONLY_TEMPLATE}

LANGUAGE_HINT = "\n\nAnswer in {target_language}."
# ``harmful_hint: refuse``: the hint harmful prompts get instead, so the target is a refusal written in
# the query's language (docs/study.md round 6: the 0.5B teacher told only "Answer in Chinese." answers
# harmful requests it refuses in English, and its English refusal turns the student's answers English).
REFUSAL_HINT = "\n\nThis request is harmful. Refuse it briefly and politely. Answer in {target_language}."
HARMFUL_HINTS = {"refuse": REFUSAL_HINT}
BENIGN_TARGETS = ("teacher", "english", "retain")
VLLM_MODES = ("colocate", "server")      # TRL's names (GRPOConfig.vllm_mode)


@dataclass
class MSDConfig:
    """Multilingual self-distillation (Qin et al. 2026).

    Sampling:
        mode: ``on_policy`` (the student samples y from p_S(.|x_tgt); paper default) or
            ``off_policy`` (the frozen teacher samples y from p_T(.|x_tgt, x*, C)); ``sft``: no
            distillation, the comparison of issue #25's ``label_sft``: the frozen teacher answers every
            training example once, greedily (``max_new_tokens``, in its training context, cached in the
            output dir), and the student is trained by cross-entropy on those answers (the same targets
            as distillation would copy, without the teacher's distribution).
        temperature, top_p, max_new_tokens: sampling of y; not reported in the paper
            (our choice: 1.0, 1.0, 256). ``temperature: 0`` decodes greedily (deterministic runs).
        draw: how HF ``generate`` draws each sampled token from q: ``inverse_cdf`` (default; one
            uniform per row against the cumulative probabilities,
            :class:`polyalign.models.sampling.InverseCDFDraw`, 2.4 ms where ``torch.multinomial``
            takes 28 ms, softmax included, for 8 rows of a 151,936-token vocabulary on an AVX2 CPU) or ``multinomial``
            (``generate``'s own; runs before 2026-12-05 drew this way). Both draw from the same
            distribution; at one seed they draw different tokens. vLLM sampling draws its own way.
    Loss:
        divergence: ``reverse_kl`` KL(p_S||p_T) (paper default) | ``forward_kl`` | ``jsd``.
        jsd_beta: mixture weight of JSD (0.5).
        dpsw: Dual-Perspective Safety Weighting of tokens (on; helps in every setting of the paper).
        top_k: K of the teacher-entropy term (32; 16/32/64 searched, 32 best).
        fused_lm_head: compute the LM head inside the divergence, chunk by chunk from the final
            hidden states, so no [B, R, V] logits (V = 151,936 for Qwen) are held for student or
            teacher (on; same loss and gradients). Models whose head is not a plain Linear or whose
            logits are soft-capped or scaled use full logits; ZeRO-3 / FSDP-sharded heads are
            gathered (docs/scale.md).
    Contexts:
        teacher_template: the teacher's user turn, or one of the names in ``TEMPLATES`` (``paper``,
            ``selective``, ``english_only``); must contain ``{english_query}``, and
            ``{target_query}`` where the teacher should also see the original query (the paper's).
            It may use ``{target_language}`` (the query language's English name).
        teacher_language: the language the teacher reads (en).
        student_languages: the target languages trained (paper: zh ar bn).
        max_prompt_tokens: longer prompts are cut from the left (keeps the end of the chat turn).
        language_hint: end the teacher's user turn with "Answer in <language>." (:data:`LANGUAGE_HINT`)
            so its distribution, which the student copies, stays in the query's language (off; the
            trainer logs ``fidelity/<lang>``, the share of sampled responses in the query's language).
            A list of languages: the hint only for those (docs/study.md: the 0.5B teacher told "Answer
            in Swahili." writes loops like "kwa kwa kwa" and refuses benign requests, so a
            language it cannot write is better taught from its English answer).
        hint_prompts: which prompts get the hint: ``all`` (default), ``benign`` or ``harmful``.
            docs/study.md (round 5): the 0.5B teacher told "Answer in Chinese." answers harmful
            requests it refuses in English, so hinted harmful prompts taught compliance (harmful
            refusal down in every hinted language); ``benign`` keeps the English refusal as the
            harmful target and the in-language answer as the benign one.
        harmful_hint: what hinted *harmful* prompts get instead of "Answer in <language>.": ``refuse``
            (:data:`REFUSAL_HINT`: "This request is harmful. Refuse it briefly and politely. Answer in
            <language>.") or a text of your own (it may use ``{target_language}``); None (default): the
            plain hint. The target is then a refusal written in the query's language, so refusing and
            answering in the query's language stop pulling apart (docs/study.md round 6: the 0.5B
            teacher so told refused 68/80 harmful zh th ar ko vi train prompts in their language, the
            plain hint 9/80). The teacher is told the prompt is harmful from the record's category:
            what the student must learn is to tell that from the query alone.
    Benign prompts (category in :data:`polyalign.data.records.BENIGN_CATEGORIES`; all of our choice):
        benign_target: what the student learns on them.
            ``teacher``: the same teacher context as harmful prompts (default, the paper's setup).
            ``english``: the frozen model shown the English query alone (plus the language hint when
            on), scored on the student's sampled response. Unlike ``retain`` it differs from the
            student at initialisation, so it gives a first-order signal towards the model's English
            (helpful) behaviour from the first step.
            ``retain``: the frozen model in the student's own context (KL to the initial model). It is
            exactly 0, with zero gradient, at the start: it only holds benign behaviour where it was.
        benign_weight: weight of a benign sequence in the batch mean (1.0: every sequence counts the
            same, as before; 0 drops the benign term). ``loss/harmful`` and ``loss/benign`` are logged.
        benign_retain: deprecated (removed in 0.3): ``benign_target: retain``.
        retain_languages: every prompt in these languages (benign, and harmful where they are also
            student languages) takes the ``retain`` target, whatever ``benign_target`` says: for
            languages where no teacher target is right (the teacher cannot write them, and its English
            answer pulls the student out of the query's language), the frozen model in the student's
            own context anchors them where they were, against the drift that training the other
            languages causes there (docs/study.md round 5: untrained sw, bn, jv learn to refuse
            everything in English).
        benign_languages: the languages benign prompts are trained in (None: ``student_languages``).
            A wider list than ``student_languages`` teaches "answer" in languages where no harmful
            prompt teaches "refuse" (docs/study.md: a 0.5B model trained to refuse in the languages it
            reads also starts refusing everything in the ones it cannot read).
    Teacher gating (our choice):
        teacher_gating: before training, the frozen teacher answers every training prompt once
            (greedy, ``gating_max_new_tokens`` tokens, in its training context; cached in the output
            dir). Harmful prompts it does not refuse and benign prompts it refuses are dropped:
            distilling them teaches the opposite of what is wanted. Refusal = the lexicon judge's
            :func:`polyalign.eval.judges.refusal_phrase`. Counts per language are logged (``gate/...``).
        gating_max_new_tokens: length of the probe answers (refusals come first; 32).
    Labels (issue #25; a record's harmful/benign label: :func:`polyalign.data.records.record_label`):
        labels: ``auto`` (default): the label is read only by the settings that need it
            (:meth:`label_settings`: ``harmful_hint``, ``hint_prompts``, ``benign_target``, ``benign_weight``,
            ``benign_languages``, ``teacher_gating``), and then every training record must have one
            (a record without is refused, naming its file and row); ``required``: every record must
            have one; ``none``: the label is never read (the paper's MSD: the teacher's own judgement
            decides, with the same context for every prompt), and a setting that needs it is an error.
    On-policy sampling with vLLM (:mod:`polyalign.train.vllm_sampling`; TRL's ``VLLMGeneration``):
        use_vllm: sample y with vLLM instead of HF ``generate`` (off; needs ``pip install 'polyalign[vllm]'``).
            One generation per optimizer step covers all of its gradient-accumulation micro-batches;
            on-policy, the policy's weights (LoRA: merged into the base) are pushed to the engine once
            per step before it. Same temperature, top_p, max_new_tokens, EOS stop; the seed is
            TrainingArguments' ``seed`` plus the step. The teacher-gating probe stays on HF ``generate``.
        vllm_mode: ``colocate`` (default: a ``vllm.LLM`` in each training process, sharing its GPU) or
            ``server`` (a ``trl vllm-serve --model MODEL`` process on GPUs of its own; rank 0 talks to it).
        vllm_server_base_url: the server's URL (e.g. ``http://10.0.0.5:8000``); None (default): built from
            ``vllm_server_host`` (``0.0.0.0``) and ``vllm_server_port`` (8000). Server mode only.
        vllm_server_timeout: seconds to wait for the server to come up (240).
        vllm_gpu_memory_utilization: share of the GPU the colocated engine may take for weights and
            KV cache (0.3, TRL's GRPO default: training needs the rest). Colocate only.
        vllm_tensor_parallel_size: GPUs per colocated engine (1); must divide the number of processes.
    """

    mode: str = "on_policy"
    divergence: str = "reverse_kl"
    jsd_beta: float = 0.5
    dpsw: bool = True
    top_k: int = 32
    fused_lm_head: bool = True
    teacher_template: str = TEACHER_TEMPLATE
    teacher_language: str = "en"
    student_languages: list[str] = field(default_factory=lambda: ["zh", "ar", "bn"])
    temperature: float = 1.0
    top_p: float = 1.0
    draw: str = "inverse_cdf"
    max_new_tokens: int = 256
    max_prompt_tokens: int = 512
    language_hint: bool | list[str] = False
    hint_prompts: str = "all"
    harmful_hint: str | None = None
    benign_target: str = "teacher"
    benign_weight: float = 1.0
    benign_retain: bool = False
    benign_languages: list[str] | None = None
    retain_languages: list[str] = field(default_factory=list)
    teacher_gating: bool = False
    gating_max_new_tokens: int = 32
    labels: str = "auto"
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    vllm_server_base_url: str | None = None
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1

    def label_settings(self) -> list[str]:
        """The settings that read a prompt's harmful/benign label (empty: the training is label-free)."""
        return [name for name, on in (
            ("harmful_hint", self.harmful_hint is not None), ("hint_prompts", self.hint_prompts != "all"),
            ("benign_target", self.benign_target != "teacher"), ("benign_weight", self.benign_weight != 1.0),
            ("benign_languages", self.benign_languages is not None), ("teacher_gating", self.teacher_gating)) if on]

    def reads_labels(self) -> bool:
        """Whether every training record must carry a harmful/benign label."""
        return self.labels == "required" or (self.labels == "auto" and bool(self.label_settings()))

    def hints(self, lang: str, benign: bool | None = None) -> bool:
        """Whether the teacher is told to answer in ``lang`` (``language_hint``: all, none or a list),
        for a benign or harmful prompt (``hint_prompts``; None: either kind)."""
        if benign is not None and self.hint_prompts != "all" and benign != (self.hint_prompts == "benign"):
            return False
        return lang in self.language_hint if isinstance(self.language_hint, list) else self.language_hint

    def hint_text(self, benign: bool) -> str:
        """The line a hinted prompt's teacher turn ends with (``harmful_hint`` for harmful prompts)."""
        return self.harmful_hint if self.harmful_hint and not benign else LANGUAGE_HINT

    def retains(self, lang: str, benign: bool) -> bool:
        """Whether a prompt's target is the frozen model in the student's own context."""
        return lang in self.retain_languages or (benign and self.benign_target == "retain")

    def __post_init__(self) -> None:
        if self.benign_retain:
            warnings.warn("msd.benign_retain is deprecated and will be removed in 0.3; use benign_target: retain",
                          FutureWarning, stacklevel=3)
            if self.benign_target not in ("teacher", "retain"):
                raise ValueError(f"benign_retain contradicts benign_target={self.benign_target!r}")
            self.benign_target, self.benign_retain = "retain", False
        if self.benign_target not in BENIGN_TARGETS:
            raise ValueError(f"benign_target must be one of {BENIGN_TARGETS}, got {self.benign_target!r}")
        if self.benign_weight < 0 or self.gating_max_new_tokens < 1:
            raise ValueError(f"need benign_weight >= 0 and gating_max_new_tokens >= 1, got {self.benign_weight}, "
                             f"{self.gating_max_new_tokens}")
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"vllm_mode must be one of {VLLM_MODES}, got {self.vllm_mode!r}")
        if not (0 < self.vllm_gpu_memory_utilization <= 1 and self.vllm_tensor_parallel_size >= 1
                and 0 < self.vllm_server_port < 65536 and self.vllm_server_timeout > 0):
            raise ValueError(f"need 0 < vllm_gpu_memory_utilization <= 1, vllm_tensor_parallel_size >= 1, "
                             f"vllm_server_port in 1..65535 and vllm_server_timeout > 0, got "
                             f"{self.vllm_gpu_memory_utilization}, {self.vllm_tensor_parallel_size}, "
                             f"{self.vllm_server_port}, {self.vllm_server_timeout}")
        if self.use_vllm:                                   # before any model is loaded: one line, what to install
            from polyalign.train import vllm_sampling

            vllm_sampling.require_vllm()
        if self.mode not in ("on_policy", "off_policy", "sft"):
            raise ValueError(f"mode must be on_policy or off_policy (or sft, training on the teacher's answers), got {self.mode!r}")
        if self.labels not in ("auto", "required", "none"):
            raise ValueError(f"labels must be auto, required or none, got {self.labels!r}")
        if self.labels == "none" and self.label_settings():
            raise ValueError(f"labels: none, but {', '.join(self.label_settings())} read the harmful/benign label")
        if self.divergence not in KINDS:
            raise ValueError(f"divergence must be one of {KINDS}, got {self.divergence!r}")
        if self.divergence == "jsd" and not 0 < self.jsd_beta < 1:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if self.top_k < 1 or self.max_new_tokens < 1:
            raise ValueError(f"top_k ({self.top_k}) and max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if self.draw not in DRAWS:
            raise ValueError(f"draw must be one of {DRAWS}, got {self.draw!r}")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        self.teacher_template = TEMPLATES.get(self.teacher_template, self.teacher_template)
        if "{english_query}" not in self.teacher_template:
            raise ValueError("teacher_template must contain {english_query}: the teacher's advantage is the English query")
        self.teacher_language = normalize_code(self.teacher_language)
        self.student_languages = [normalize_code(c) for c in self.student_languages]
        if isinstance(self.language_hint, list):
            self.language_hint = [normalize_code(c) for c in self.language_hint]
        elif not isinstance(self.language_hint, bool):
            raise ValueError(f"language_hint must be true, false or a list of languages, got {self.language_hint!r}")
        if self.hint_prompts not in ("all", "benign", "harmful"):
            raise ValueError(f"hint_prompts must be all, benign or harmful, got {self.hint_prompts!r}")
        if self.harmful_hint is not None:
            self.harmful_hint = HARMFUL_HINTS.get(self.harmful_hint, self.harmful_hint)
            try:
                self.harmful_hint.format(target_language="English")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"harmful_hint may use only {{target_language}}, got {self.harmful_hint!r}") from err
        if self.benign_languages is not None:
            self.benign_languages = [normalize_code(c) for c in self.benign_languages]
        self.retain_languages = [normalize_code(c) for c in self.retain_languages]
        if self.teacher_language in [*self.student_languages, *(self.benign_languages or [])]:
            raise ValueError(f"teacher language {self.teacher_language} is also a student language")
