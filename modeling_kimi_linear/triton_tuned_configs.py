"""Autotuning choices of fla's Triton kernels recorded on the lent GPUs, by GPU and versions: written by
``triton_tuning.dump`` (``bench/gpu_scale.py --record-tuning``); read by ``triton_tuning.apply``."""

RECORDS = {
    'NVIDIA H100 80GB HBM3 | fla 0.6.0 | triton 3.6.0': {
        'fla.modules.causal_conv1d.ops:causal_conv1d_fwd_kernel': [
            [[12288, 4, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16'], {'kwargs': {'BD': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 4}],
        ],
        'fla.modules.conv.causal_conv1d:causal_conv1d_fwd_kernel': [
            [[12288, 4, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16'], {'kwargs': {'BD': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 4}],
        ],
        'fla.modules.conv.short_conv:causal_conv1d_fwd_kernel': [
            [[12288, 4, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16'], {'kwargs': {'BD': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 4}],
        ],
        'fla.modules.conv.triton.kernels:causal_conv1d_fwd_kernel': [
            [[12288, 4, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16'], {'kwargs': {'BD': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 4}],
        ],
        'fla.modules.conv.triton.ops:causal_conv1d_fwd_kernel': [
            [[12288, 4, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16'], {'kwargs': {'BD': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 4}],
        ],
        'fla.modules.conv.triton:causal_conv1d_fwd_kernel': [
            [[12288, 4, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16'], {'kwargs': {'BD': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 4}],
        ],
        'fla.modules.fused_norm_gate:layer_norm_gated_fwd_kernel': [
            [[128, 1, True, False, False, True, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.float32'], {'kwargs': {'BT': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 8}],
        ],
        'fla.modules.l2norm:l2norm_fwd_kernel': [
            [[128, 1, 'torch.bfloat16', 'torch.bfloat16', 'torch.float32'], {'kwargs': {'BT': 8}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 1}],
            [[128, 2, 'torch.bfloat16', 'torch.bfloat16', 'torch.float32'], {'kwargs': {'BT': 8}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 1}],
        ],
        'fla.modules.norm.fused_norm_gate:layer_norm_gated_fwd_kernel': [
            [[128, 1, True, False, False, True, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.float32'], {'kwargs': {'BT': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 8}],
        ],
        'fla.modules.norm.l2norm:l2norm_fwd_kernel': [
            [[128, 1, 'torch.bfloat16', 'torch.bfloat16', 'torch.float32'], {'kwargs': {'BT': 8}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 1}],
            [[128, 2, 'torch.bfloat16', 'torch.bfloat16', 'torch.float32'], {'kwargs': {'BT': 8}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 1}],
        ],
        'fla.ops.common.chunk_delta_h:chunk_gated_delta_rule_fwd_kernel_h_blockdim64': [
            [[32, 32, 128, 128, 64, False, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.float32', 'torch.bfloat16', 'torch.float32'], {'kwargs': {'BV': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 4, 'num_warps': 4}],
        ],
        'fla.ops.gla.chunk:chunk_gla_fwd_kernel_o': [
            [[64, 32, False, 128, 128, 'torch.bfloat16', 'torch.bfloat16', 'torch.float32', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16'], {'kwargs': {'BK': 64, 'BV': 128}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 4, 'num_warps': 4}],
        ],
        'fla.ops.kda.chunk_intra:chunk_kda_fwd_kernel_inter_solve_fused': [
            [[32, 32, 128, 64, 16, 4, 'torch.bfloat16', 'torch.bfloat16', 'torch.float32', 'torch.bfloat16', 'torch.bfloat16', 'torch.float32', 'torch.bfloat16'], {'kwargs': {'BK': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 1}],
            [[32, 32, 128, 64, 16, 4, 'torch.bfloat16', 'torch.bfloat16', 'torch.float32', 'torch.float32', 'torch.bfloat16', 'torch.float32', 'torch.bfloat16'], {'kwargs': {'BK': 32}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 1}],
        ],
        'fla.ops.kda.chunk_intra_token_parallel:chunk_kda_fwd_kernel_intra_token_parallel': [
            [[128, 32, 32, 'torch.bfloat16', 'torch.bfloat16', 'torch.float32', 'torch.bfloat16', 'torch.bfloat16', 'torch.float32'], {'kwargs': {'BH': 2}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 1}],
            [[128, 32, 32, 'torch.bfloat16', 'torch.bfloat16', 'torch.float32', 'torch.float32', 'torch.bfloat16', 'torch.float32'], {'kwargs': {'BH': 2}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 1}],
        ],
        'fla.ops.kda.wy_fast:recompute_w_u_fwd_kda_kernel': [
            [[32, 32, 128, 128, 64, 64, 64, False, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.float32'], {'kwargs': {}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 2, 'num_warps': 4}],
            [[32, 32, 128, 128, 64, 64, 64, False, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.float32', 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16', 'torch.float32'], {'kwargs': {}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 2, 'num_warps': 4}],
        ],
        'fla.ops.utils.cumsum:chunk_local_cumsum_vector_kernel': [
            [[1, 32, 128, 64, False, False, 'torch.float32', 'torch.float32'], {'kwargs': {'BS': 64}, 'maxnreg': None, 'num_ctas': 1, 'num_stages': 3, 'num_warps': 2}],
        ],
    },
}
