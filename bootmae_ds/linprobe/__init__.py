"""Linear probing: the official protocol as a distributed, resumable run (``trainer``), and the
cached-feature yardstick as an option of the same launcher (``cached``)."""
