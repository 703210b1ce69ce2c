"""The off-box copy: Litestream's replica, the checkpoints published beside it, restore."""
