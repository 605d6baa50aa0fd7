"""Building (or re-binding) the worker's engine over the KV caches vLLM registers."""

from __future__ import annotations

from lmcache.integration.vllm.config import ENGINE_NAME, attention_backend_name, mla_enabled


def connect_engine(vllm_config, config, kv_caches: dict, use_layerwise: bool, world_size: int, rank: int):
    """(engine, gpu connector, attention backend name) for these KV caches: the process's
    engine is built once; registered again (sleep mode, new tensors), it keeps its tiers
    and takes the new device connector."""
    from lmcache.platforms import current_platform
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.gpu_connector import create_gpu_connector

    layer_names = list(kv_caches)
    backend = attention_backend_name(vllm_config, layer_names)
    gpu_connector = create_gpu_connector(
        kv_caches, use_layerwise=use_layerwise, attn_backend=backend, platform=current_platform(),
        native_blocks=config.cpu_native_blocks, use_mla=mla_enabled(vllm_config.model_config),
        slot_buckets=config.hpu_slot_buckets,
    )
    metadata = engine_metadata(vllm_config, config, gpu_connector, world_size, rank)
    engine = LMCacheEngineBuilder.get_or_create(ENGINE_NAME, config, metadata, gpu_connector)
    if engine.gpu_connector is not gpu_connector:
        if engine.metadata != metadata:
            raise ValueError(
                f"LMCache: the KV caches registered again describe {metadata}, but engine "
                f"{ENGINE_NAME!r} was built for {engine.metadata}: its keys would not describe the data"
            )
        engine.set_gpu_connector(gpu_connector)  # the old tensors are gone
    return engine, gpu_connector, backend


def engine_metadata(vllm_config, config, gpu_connector, world_size: int, rank: int):
    from lmcache.integration.vllm.model_identity import model_identity
    from lmcache.v1.cache_engine import LMCacheEngineMetadata

    model_config = vllm_config.model_config
    parallel_config = vllm_config.parallel_config
    use_mla = mla_enabled(model_config)
    return LMCacheEngineMetadata(
        model_name=str(model_config.model),
        world_size=world_size,
        worker_id=rank,
        kv_dtype=gpu_connector.kv_dtype,
        kv_shape=(
            gpu_connector.num_layers,
            1 if use_mla else 2,
            config.chunk_size,
            model_config.get_num_kv_heads(parallel_config),
            model_config.get_head_size(),
        ),
        use_mla=use_mla,
        # Portable memory objects hold K/V in plain per-token order whatever the paged
        # layout, so the device layout stays out of the keys: CUDA, Gaudi and CPU
        # instances of the same model share one disk directory or Redis server. Native
        # CPU blocks (cpu_native_blocks) are vLLM's tiled bytes: their tag keys them apart.
        layout_fingerprint=gpu_connector.host_format_tag,
        model_identity=model_identity(vllm_config),  # revision, weights, quantization, ...
    )
