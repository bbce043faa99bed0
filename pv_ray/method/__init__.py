"""The PersonalVideo method: the tuning loop, its losses and the prompt augmentation."""
