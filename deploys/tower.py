"""Deploy a tower:  pyinfra inventory/<tower>.py deploys/tower.py"""

from roles.tower import deploy_tower

deploy_tower()
