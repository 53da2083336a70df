"""Did abliteration work, and what did it cost: refusals, KL, capability, the judge, layer choice."""
