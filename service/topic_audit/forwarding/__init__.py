"""Forwarding to the app's handler: the outbox and the deliveries chain, sending, the delivering loop, Before-callbacks relayed."""
