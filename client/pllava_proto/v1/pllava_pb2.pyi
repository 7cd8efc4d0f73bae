from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class ServerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVER_ROLE_UNSPECIFIED: _ClassVar[ServerRole]
    SERVER_ROLE_ENCODER: _ClassVar[ServerRole]
    SERVER_ROLE_DECODER: _ClassVar[ServerRole]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_STRING: _ClassVar[FinishReason]
    FINISH_REASON_CONTEXT_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_UINT8: DType
SERVER_ROLE_UNSPECIFIED: ServerRole
SERVER_ROLE_ENCODER: ServerRole
SERVER_ROLE_DECODER: ServerRole
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_STRING: FinishReason
FINISH_REASON_CONTEXT_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class TensorMeta(_message.Message):
    __slots__ = ("dtype", "shape", "nbytes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("offset", "data", "crc32")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    crc32: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "model_path", "model_type", "role", "dtype", "device", "num_frames", "pooling_shape", "num_visual_tokens", "vision_hidden_size", "text_hidden_size", "max_context", "max_batch", "max_queue", "templates", "encoder_target", "version")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    POOLING_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VISION_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TEXT_HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_TARGET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_path: str
    model_type: str
    role: ServerRole
    dtype: DType
    device: str
    num_frames: int
    pooling_shape: _containers.RepeatedScalarFieldContainer[int]
    num_visual_tokens: int
    vision_hidden_size: int
    text_hidden_size: int
    max_context: int
    max_batch: int
    max_queue: int
    templates: _containers.RepeatedScalarFieldContainer[str]
    encoder_target: str
    version: str
    def __init__(self, model_id: _Optional[str] = ..., model_path: _Optional[str] = ..., model_type: _Optional[str] = ..., role: _Optional[_Union[ServerRole, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., device: _Optional[str] = ..., num_frames: _Optional[int] = ..., pooling_shape: _Optional[_Iterable[int]] = ..., num_visual_tokens: _Optional[int] = ..., vision_hidden_size: _Optional[int] = ..., text_hidden_size: _Optional[int] = ..., max_context: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_queue: _Optional[int] = ..., templates: _Optional[_Iterable[str]] = ..., encoder_target: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Frames(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("video", "frames", "num_frames", "request_id", "video_name")
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VIDEO_NAME_FIELD_NUMBER: _ClassVar[int]
    video: bytes
    frames: Frames
    num_frames: int
    request_id: str
    video_name: str
    def __init__(self, video: _Optional[bytes] = ..., frames: _Optional[_Union[Frames, _Mapping]] = ..., num_frames: _Optional[int] = ..., request_id: _Optional[str] = ..., video_name: _Optional[str] = ...) -> None: ...

class EncodeTimings(_message.Message):
    __slots__ = ("queue_ms", "video_decode_ms", "encode_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    video_decode_ms: float
    encode_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., video_decode_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class EncodeHeader(_message.Message):
    __slots__ = ("visual_tokens", "num_frames", "model_id", "timings")
    VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    visual_tokens: TensorMeta
    num_frames: int
    model_id: str
    timings: EncodeTimings
    def __init__(self, visual_tokens: _Optional[_Union[TensorMeta, _Mapping]] = ..., num_frames: _Optional[int] = ..., model_id: _Optional[str] = ..., timings: _Optional[_Union[EncodeTimings, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: EncodeHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[EncodeHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class CaptionRequest(_message.Message):
    __slots__ = ("video", "frames", "prompt", "template", "num_frames", "sampling", "request_id", "video_name")
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VIDEO_NAME_FIELD_NUMBER: _ClassVar[int]
    video: bytes
    frames: Frames
    prompt: str
    template: str
    num_frames: int
    sampling: SamplingParams
    request_id: str
    video_name: str
    def __init__(self, video: _Optional[bytes] = ..., frames: _Optional[_Union[Frames, _Mapping]] = ..., prompt: _Optional[str] = ..., template: _Optional[str] = ..., num_frames: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., video_name: _Optional[str] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "video_decode_ms", "encode_ms", "transfer_ms", "prefill_ms", "time_to_first_token_ms", "decode_ms", "decode_tokens_per_s", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    video_decode_ms: float
    encode_ms: float
    transfer_ms: float
    prefill_ms: float
    time_to_first_token_ms: float
    decode_ms: float
    decode_tokens_per_s: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., video_decode_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., transfer_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class FinalEvent(_message.Message):
    __slots__ = ("finish_reason", "caption", "prompt", "prompt_token_ids", "token_ids", "num_visual_tokens", "num_prompt_tokens", "num_generated_tokens", "num_frames", "timings", "visual_tokens_cached", "stop_string", "model_id", "request_id", "num_prompt_tokens_reused")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_VISUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    VISUAL_TOKENS_CACHED_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_REUSED_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    caption: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_visual_tokens: int
    num_prompt_tokens: int
    num_generated_tokens: int
    num_frames: int
    timings: Timings
    visual_tokens_cached: bool
    stop_string: str
    model_id: str
    request_id: str
    num_prompt_tokens_reused: int
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., caption: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_visual_tokens: _Optional[int] = ..., num_prompt_tokens: _Optional[int] = ..., num_generated_tokens: _Optional[int] = ..., num_frames: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., visual_tokens_cached: _Optional[bool] = ..., stop_string: _Optional[str] = ..., model_id: _Optional[str] = ..., request_id: _Optional[str] = ..., num_prompt_tokens_reused: _Optional[int] = ...) -> None: ...

class CaptionEvent(_message.Message):
    __slots__ = ("token", "final")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    token: TokenEvent
    final: FinalEvent
    def __init__(self, token: _Optional[_Union[TokenEvent, _Mapping]] = ..., final: _Optional[_Union[FinalEvent, _Mapping]] = ...) -> None: ...
