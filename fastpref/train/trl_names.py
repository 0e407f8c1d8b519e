"""TRL / transformers option names that fastpref train has no field for.

A TRL recipe carries many TrainingArguments / TRL config names. Each one here is either translated
(`translate`), accepted because it cannot change what fastpref computes (`NO_EFFECT`: worker counts,
log levels, hub settings without push_to_hub), accepted at its TRL 1.16 default (it asks for nothing
fastpref does not do), or refused, before the model loads, as "not supported by fastpref train".
`TRL_DEFAULTS` was read from TRL 1.16's SFTConfig / DPOConfig / RewardConfig / ModelConfig /
ScriptArguments and transformers 5's TrainingArguments (tests/test_train_trl.py checks it against the
installed TRL).
"""

from __future__ import annotations

NO_EFFECT = {
    "dataset_num_proc", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "log_level", "log_level_replica",
    "log_on_each_node", "logging_first_step", "project", "remove_unused_columns", "skip_memory_metrics",
    "include_num_input_tokens_seen", "ddp_timeout", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
    "ddp_broadcast_buffers", "do_train", "do_eval", "do_predict", "hub_model_id", "hub_strategy", "hub_private_repo",
    "hub_revision", "hub_always_push", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    "local_rank", "torch_empty_cache_steps", "pad_to_multiple_of", "gradient_checkpointing_kwargs",
}

# What a name's value means for fastpref's own fields: {name: {value: {field: value}}}.
TRANSLATED = {
    "eval_strategy": {"steps": {}, "no": {"eval_steps": None}},
    "save_strategy": {"steps": {}, "no": {"save_steps": None}},
    "logging_strategy": {"steps": {}},
    "optim": {"adamw_torch": {}, "adamw_torch_fused": {}},
    "dtype": {"float32": {}, "auto": {}},  # fastpref loads float32 master weights; bf16 compute is --bf16
    "torch_dtype": {"float32": {}, "auto": {}},
    "lr_scheduler_kwargs": {None: {}},
    "lora_task_type": {"CAUSAL_LM": {}, "SEQ_CLS": {}},  # fastpref picks the one the task needs
    "attn_implementation": {None: {}, "sdpa": {}},  # transformers' default
    "max_seq_length": {},  # older TRL's name: refused with a hint
}
TRANSLATED["evaluation_strategy"] = TRANSLATED["eval_strategy"]  # transformers' older name

HINTS = {
    "dtype": "fastpref keeps float32 master weights; --bf16 true computes in bf16 (autocast)",
    "torch_dtype": "fastpref keeps float32 master weights; --bf16 true computes in bf16 (autocast)",
    "max_seq_length": "use --max_length",
    "use_liger_kernel": "fastpref's fused head already never materialises the logits",
    "fp16": "use --bf16",
}

TASK_DEFAULTS = {"sft": {"loss_type": "nll"}}  # TRL names that are fastpref fields of another task only
# GRPOConfig names fastpref train grpo does not implement: accepted at TRL 1.16's default, refused otherwise
TASK_DEFAULTS["grpo"] = {
    "use_vllm": False, "vllm_mode": "colocate", "vllm_model_impl": "vllm", "vllm_server_base_url": None,
    "vllm_server_host": "0.0.0.0", "vllm_server_port": 8000, "vllm_server_timeout": 240.0,
    "vllm_gpu_memory_utilization": 0.3, "vllm_tensor_parallel_size": 1, "vllm_enable_sleep_mode": False,
    "vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": "sequence_mask",
    "vllm_importance_sampling_clip_max": 3.0, "vllm_importance_sampling_clip_min": None,
    "use_transformers_paged": False, "use_transformers_continuous_batching": False,
    "generation_batch_size": None, "steps_per_generation": None, "num_generations_eval": None, "min_p": None,
    "repetition_penalty": 1.0, "generation_kwargs": None, "chat_template_kwargs": None, "cache_implementation": None,
    "use_adaptive_entropy": False, "entropy_target": 0.2, "entropy_coef_min": 0.0, "entropy_coef_max": 1.0,
    "entropy_coef_delta": 0.005, "off_policy_mask_threshold": None, "multi_objective_aggregation":
    "sum_then_normalize", "log_completions": False, "num_completions_to_print": None, "log_unique_prompts": False,
    "vllm_structured_outputs_regex": None, "vllm_group_port": 51216, "vllm_max_model_length": None,
    "transformers_continuous_batching_config": None, "vllm_importance_sampling_cap": None,
    "max_tool_calling_iterations": None, "cast_lm_head_to_fp32": False, "ds3_gather_for_generation": True,
    "shuffle_dataset": True, "log_multimodal": True, "log_completions_hub_repo": None,
}
TASK_DEFAULTS["raft"] = TASK_DEFAULTS["grpo"]  # RAFT is no TRL trainer: GRPOConfig's sampling names
TASK_DEFAULTS["rloo"] = {k: v for k, v in TASK_DEFAULTS["grpo"].items() if k not in (
    "cast_lm_head_to_fp32", "use_adaptive_entropy", "entropy_target", "entropy_coef_min", "entropy_coef_max",
    "entropy_coef_delta", "off_policy_mask_threshold", "multi_objective_aggregation", "max_tool_calling_iterations",
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
    "vllm_importance_sampling_clip_min", "log_completions_hub_repo", "vllm_importance_sampling_cap")}

TRL_DEFAULTS = {
    'accelerator_config': None,
    'activation_checkpointing': None,
    'activation_checkpointing_kwargs': None,
    'activation_offloading': False,
    'attn_implementation': None,
    'auto_find_batch_size': False,
    'average_tokens_across_devices': True,
    'batch_eval_metrics': False,
    'bf16_full_eval': False,
    'bnb_4bit_quant_storage': None,
    'bnb_4bit_quant_type': 'nf4',
    'chat_template_path': None,
    'data_seed': None,
    'dataloader_drop_last': False,
    'dataloader_in_order': True,
    'dataloader_multiprocessing_context': None,
    'dataloader_num_workers': 0,
    'dataloader_persistent_workers': False,
    'dataloader_pin_memory': True,
    'dataloader_prefetch_factor': None,
    'dataset_kwargs': None,
    'dataset_num_proc': None,
    'dataset_streaming': False,
    'dataset_text_field': 'text',
    'ddp_backend': None,
    'ddp_broadcast_buffers': None,
    'ddp_bucket_cap_mb': None,
    'ddp_find_unused_parameters': None,
    'ddp_static_graph': None,
    'ddp_timeout': 1800,
    'debug': '',
    'deepspeed': None,
    'do_eval': False,
    'do_predict': False,
    'do_train': False,
    'dtype': 'float32',
    'enable_jit_checkpoint': False,
    'eos_token': None,
    'eval_accumulation_steps': None,
    'eval_delay': 0,
    'eval_do_concat_batches': True,
    'eval_on_start': False,
    'eval_packing': None,
    'eval_strategy': 'no',
    'eval_use_gather_object': False,
    'fp16': False,
    'fp16_full_eval': False,
    'fsdp_config': None,
    'full_determinism': False,
    'gradient_checkpointing_kwargs': None,
    'greater_is_better': None,
    'hub_always_push': False,
    'hub_model_id': None,
    'hub_private_repo': None,
    'hub_revision': None,
    'hub_strategy': 'every_save',
    'hub_token': None,
    'ignore_bias_buffers': False,
    'ignore_data_skip': False,
    'include_for_metrics': [],
    'include_num_input_tokens_seen': 'no',
    'label_names': None,
    'label_smoothing_factor': 0.0,
    'length_column_name': 'length',
    'liger_kernel_config': None,
    'load_best_model_at_end': False,
    'load_in_4bit': False,
    'load_in_8bit': False,
    'local_rank': -1,
    'log_level': 'passive',
    'log_level_replica': 'warning',
    'log_on_each_node': True,
    'logging_first_step': False,
    'logging_nan_inf_filter': True,
    'logging_strategy': 'steps',
    'lora_modules_to_save': None,
    'lora_target_parameters': None,
    'lora_task_type': 'CAUSAL_LM',
    'lr_scheduler_kwargs': None,
    'metric_for_best_model': None,
    'model_init_kwargs': None,
    'model_revision': 'main',
    'neftune_noise_alpha': None,
    'optim': 'adamw_torch_fused',
    'optim_args': None,
    'optim_target_modules': None,
    'packing': False,
    'packing_strategy': 'bfd',
    'pad_to_multiple_of': 'auto',
    'pad_token': None,
    'padding_free': False,
    'parallelism_config': None,
    'prediction_loss_only': False,
    'project': 'huggingface',
    'push_to_hub': False,
    'ref_model_mixup_alpha': 0.6,
    'ref_model_sync_steps': 512,
    'remove_unused_columns': True,
    'report_to': 'none',
    'restore_callback_states_from_checkpoint': False,
    'router_aux_loss_coef': None,
    'run_name': None,
    'save_on_each_node': False,
    'save_only_model': False,
    'save_strategy': 'steps',
    'shuffle_dataset': False,
    'skip_memory_metrics': True,
    'sync_ref_model': False,
    'tf32': None,
    'torch_compile': False,
    'torch_compile_backend': None,
    'torch_compile_mode': None,
    'torch_empty_cache_steps': None,
    'trackio_bucket_id': None,
    'trackio_space_id': None,
    'trackio_static_space_id': None,
    'train_sampling_strategy': 'random',
    'trust_remote_code': False,
    'use_bnb_nested_quant': False,
    'use_cache': False,
    'use_cpu': False,
    'use_dora': False,
    'use_liger_kernel': False,
}


def _same(value, default) -> bool:
    if isinstance(default, str) and not isinstance(value, str):
        if isinstance(value, bool) and default in ("no", "yes"):  # YAML 1.1 reads `no` as false
            return value == (default == "yes")
        return str(value).lower() == default.lower()
    if default is None:
        return value is None or value == {} or value == [] or (isinstance(value, str) and value.lower() in ("", "none"))
    return value == default


def translate(task: str, name: str, value) -> dict:
    """The fastpref field updates a TRL option asks for; ValueError naming it when fastpref cannot do it."""
    if name in NO_EFFECT:
        return {}
    if name in TRANSLATED:
        for accepted, updates in TRANSLATED[name].items():
            if _same(value, accepted) or (isinstance(value, str) and value == accepted):
                return dict(updates)
        choices = [v for v in TRANSLATED[name] if v is not None]
        accepts = f"; it accepts {choices}" if choices else ""
        raise ValueError(f"--{name} {value!r} is not supported by fastpref train{accepts}{_hint(name)}")
    defaults = {**TRL_DEFAULTS, **TASK_DEFAULTS.get(task, {})}
    if name not in defaults:
        raise KeyError(name)
    if _same(value, defaults[name]):
        return {}
    raise ValueError(
        f"--{name} {value!r} is not supported by fastpref train (only its TRL default {defaults[name]!r}){_hint(name)}"
    )


def _hint(name: str) -> str:
    return f"; {HINTS[name]}" if name in HINTS else ""
