"""metaplastic: meta-learn local synaptic plasticity rules."""
