"""The quantization core, one file per stage's piece (the stages themselves: ``method.py``).

    method.py   Method, QuantContext, QuantState, STAGES: prepare -> transform -> plan -> grid -> round
                -> weights -> correct -> calibrate -> train
    bn.py       prepare: copy, split fused norm-activations, fold BN
    planner.py  plan: LayerPlan, the protocol's rules, PLANNERS
    grid.py     grid: the uniform affine grid (qrange, Grid, weight_grid, activation_grid)
    modules.py  weights / calibrate: QuantLayer, ActQuant, baked weights
    learn.py    trainable quantizers: STE weights, AdaRound soft bits, LSQ activations, Lp grid search
    ranges.py   calibrate: activation range rules (RANGE_RULES) and calibrate_activations
"""
