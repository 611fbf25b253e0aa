"""The AI-feedback half of Zephyr: the model pool completes, a judge scores, binarization makes preference pairs."""
