"""Host-side numpy preprocessing: images, chat prompts, token ids, mRoPE positions."""
