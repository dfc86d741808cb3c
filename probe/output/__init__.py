"""Results on disk and for people: JSON, saved heads, reports, pictures."""
