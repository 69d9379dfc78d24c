"""The Drafter gRPC service: one draft source (drafters/) behind Propose / Release / Info.

`servicer.py` translates messages to `DraftRequest`s and trees back; `server.py` loads the model, builds the
drafter and serves it."""
