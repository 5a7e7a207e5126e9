"""What the upstream engines share: the adapter interface (adapter.py), the runner of upstream's
command lines (run.py), staging of the model and data where upstream looks (staging.py), the
CPU shim for upstream code that hard-codes CUDA (shim.py), and the conversion of upstream's
outputs to the contract's artifact (convert.py)."""
