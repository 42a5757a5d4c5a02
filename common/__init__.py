"""The little the three scripts share: env construction, seeding, the replay buffer."""
