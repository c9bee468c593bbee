from .errors import UserError
