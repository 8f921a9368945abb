"""Results: the records of query jobs and answer versions, export review, revisions, downloads,
lineage and trace, the disclosure checks, fingerprints and read bounds."""
