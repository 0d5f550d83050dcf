"""Stage 3: training loops, fine-tuning and the transfer-vs-scratch comparison. They return results and draw nothing."""
