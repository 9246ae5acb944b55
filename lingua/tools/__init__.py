"""Command-line tools: stool (SLURM submission), plot (run curves), attention_report (which kernel runs)."""
