"""Runnable examples on top of the library (nothing in megatron_lite imports them):

    torchrun --nproc_per_node 2 -m megatron_lite.examples.tp_block
"""
