"""Training loops of the app other than SAC's (which lives in `fasttd3_lora.train`); `train.LOOPS` maps
`algo.name` to each."""
