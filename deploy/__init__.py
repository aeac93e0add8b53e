"""pdserve.deploy: launching clusters (pdserve up) and deployment files."""
