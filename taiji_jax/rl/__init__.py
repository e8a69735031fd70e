"""RL alignment: rollouts, rewards, policy objectives, reward weighting."""
