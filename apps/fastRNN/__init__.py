"""minGRU, minLSTM and Hawk language models trained by lingua's shared loop (see model.py and scan.py); hf_lingua_rnn.py
exports them as lingua's remote-code LinguaRNNForCausalLM."""
