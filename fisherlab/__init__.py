"""fisherlab: how well cheap Kronecker approximations match the exact Fisher."""
