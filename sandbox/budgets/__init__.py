"""The privacy budget ledger: ε reserved, charged and refunded per scene and per company and dataset."""
